"""TRL's SFTTrainer as an engine: the same model and sequences, packed, measured as Trainer is.

The sequences of harness.step.data go in already tokenized, each exactly seq_len tokens, and
SFTTrainer packs them into blocks of max_length = seq_len with its "wrapped" strategy, so every
block is one of the lab's sequences, in the lab's order. ("bfd", TRL's default, makes
padding-free batches that only FlashAttention keeps apart; the lab's models run SDPA.)
SFTTrainer computes the loss its own way (a chunked, fused LM head; entropy and token accuracy
as metrics), which is part of what is measured.
"""

from __future__ import annotations

import tempfile

from harness.engines import trainer
from harness.engines.arguments import mapped_arguments


def train(run) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    session = run.session
    sequences = trainer.Sequences(run.batches, session.steps_in_all)
    dataset = datasets.Dataset.from_dict({"input_ids": [sequences[i]["input_ids"].tolist()
                                                        for i in range(len(sequences))]})
    with tempfile.TemporaryDirectory() as output_dir:
        arguments, notes = mapped_arguments(run.cfg, run.technique, "trl-sft", run.device.type, output_dir,
                                            run.source.config)
        arguments = {"packing": True, "packing_strategy": "wrapped", "max_length": run.cfg.seq_len,
                     "dataset_num_proc": None, **arguments}
        trainer.check_arguments("trl-sft", arguments)
        with session.loading():
            model = trainer.build_model(run)
            sft = SFTTrainer(model=model, args=SFTConfig(**arguments), train_dataset=dataset,
                             processing_class=run.tokenizer, optimizers=trainer.optimizers(run, model),
                             callbacks=[trainer.measured_callback(session)])
        session.loaded(model)
        sft.train()
    return trainer.engine_record("trl-sft", "trl", arguments, notes, sft)
