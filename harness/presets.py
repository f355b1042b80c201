"""Named architecture presets: the exact shapes of well-known models, initialised at random.

Memory and speed of a training step depend on the shapes, not on the weight values, so a
preset measures what the real model would, without a download. Shapes are those of each
model's published config.json.
"""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # A few million parameters: every technique runs a step in seconds on a laptop CPU. Every
    # width is a multiple of 64: bitsandbytes' CPU 4-bit kernels restore a weight wrongly when
    # its rows (in_features) are not a multiple of the 64-element block.
    "tiny-llama": dict(model_type="llama", vocab_size=4096, hidden_size=256, intermediate_size=704,
                       num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # ~100M parameters: the lab's own pretrained base on a GPU (harness.lab.pretrain).
    "llama-100m": dict(model_type="llama", vocab_size=16384, hidden_size=768, intermediate_size=2048,
                       num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4,
                       max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # TinyLlama/TinyLlama-1.1B: 1,100,048,384 parameters.
    "tinyllama-1.1b": dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                           num_hidden_layers=22, num_attention_heads=32, num_key_value_heads=4,
                           max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-2-7b-hf: 6,738,415,616 parameters (the documents' "7B").
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-3.1-8B: 8,030,261,248 parameters; a 128k vocabulary and a 128k context
    # (RoPE scaled from 8k: the scaling changes no tensor's size, so it is left out here).
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=False),
    # meta-llama/Llama-3.2-3B: 3,212,749,824 parameters; input and output embeddings tied.
    "llama-3.2-3b": dict(model_type="llama", vocab_size=128256, hidden_size=3072, intermediate_size=8192,
                         num_hidden_layers=28, num_attention_heads=24, num_key_value_heads=8, head_dim=128,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                         tie_word_embeddings=True),
    # meta-llama/Llama-2-13b-hf: 13,015,864,320 parameters.
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120, intermediate_size=13824,
                        num_hidden_layers=40, num_attention_heads=40, num_key_value_heads=40,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Llama-2-70b-hf: 68,976,648,192 parameters; grouped-query attention (8 KV heads).
    "llama-2-70b": dict(model_type="llama", vocab_size=32000, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False),
    # meta-llama/Meta-Llama-3-70B: 70,553,706,496 parameters; a 128k vocabulary.
    "llama-3-70b": dict(model_type="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672,
                        num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        tie_word_embeddings=False),
    # Qwen/Qwen2.5-7B: 7,615,616,512 parameters; biases on q, k and v, a 152k vocabulary.
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                       max_position_embeddings=32768, rms_norm_eps=1e-6, rope_theta=1000000.0,
                       tie_word_embeddings=False),
    # microsoft/Phi-3-mini-4k-instruct: 3,821,079,552 parameters; fused qkv_proj and gate_up_proj.
    "phi-3-mini": dict(model_type="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       max_position_embeddings=4096, rms_norm_eps=1e-5, rope_theta=10000.0,
                       pad_token_id=32000, tie_word_embeddings=False),
    # mistralai/Mistral-7B-v0.1: 7,241,732,096 parameters.
    "mistral-7b": dict(model_type="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                       max_position_embeddings=32768, rms_norm_eps=1e-5, rope_theta=10000.0,
                       sliding_window=4096, tie_word_embeddings=False),
    # mistralai/Mixtral-8x7B-v0.1: 46,702,792,704 parameters, 2 of 8 experts active per token.
    "mixtral-8x7b": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                         num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
                         rms_norm_eps=1e-5, rope_theta=1e6, sliding_window=None, tie_word_embeddings=False),
}

# Published parameter counts, used by tests to check that a preset has the real shape.
PUBLISHED_PARAMETERS = {
    "tinyllama-1.1b": 1_100_048_384,
    "llama-2-7b": 6_738_415_616,
    "llama-3.1-8b": 8_030_261_248,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-70b": 70_553_706_496,
    "llama-3.2-3b": 3_212_749_824,
    "qwen2.5-7b": 7_615_616_512,
    "phi-3-mini": 3_821_079_552,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
}


def preset_config(name: str):
    """A transformers config object for a preset."""
    from transformers import AutoConfig

    settings = dict(PRESETS[name])
    return AutoConfig.for_model(settings.pop("model_type"), **settings)
