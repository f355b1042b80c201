"""The fit table's longest sequences and largest micro-batches confirmed by simulation (harness.predict.confirm,
`predict --confirm-fits`)."""

import json
import math
from dataclasses import replace

import pytest
from conftest import EXPERIMENTS

from harness.cards import card_bytes
from harness.measure.budget import card_cap_bytes
from harness.predict import confirm
from harness.predict.search import Simulated, largest_fitting, longest_sequence, setup, simulate_under_card
from harness.report.answer import seq_method
from harness.report.fits import SIMULATED_MARK, _micro_batch_text, _seq_text, confirmed_counts

# Mistral-7B QLoRA with checkpointing on a 16 GB card: an answer the card limits
TARGET = confirm.Target(EXPERIMENTS / "qlora.yaml", "mistral-7b", {"gradient_checkpointing": True}, 16)


def _small_llama(folder):
    """A two-layer Llama with a 32k vocabulary and a 16k context: its logits fill a 2 GB card near 1,300 tokens."""
    path = folder / "config.json"
    path.write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 32000,
        "max_position_embeddings": 16384, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16"}))
    return str(path)


def _fake_simulation(monkeypatch, fragmentation: float, seen_at_failure: float):
    """A simulated step that needs its analytic device bytes times `fragmentation`, and that, where it runs
    out, says it needed only `seen_at_failure` times them (a failed request sees part of the shortfall).
    Returns the lengths simulated and the true boundary."""
    found = setup(TARGET.experiment, TARGET.model, TARGET.overrides)
    cap = card_bytes(TARGET.card_gb)
    calls = []

    def simulate(experiment, model, seq_len, micro_batch, overrides, device_type, card_cap, allocator_cap,
                 allocator="default"):
        calls.append(seq_len)
        need = int(found.device(seq_len, micro_batch) * fragmentation)
        if need <= card_cap:
            return Simulated(True, need, need)
        return Simulated(False, need, max(int(found.device(seq_len, micro_batch) * seen_at_failure), card_cap + 1))
    monkeypatch.setattr(confirm, "simulate_under_card", simulate)
    boundary = largest_fitting(lambda n: int(found.device(n, 1) * fragmentation), cap, found.context).value
    return calls, boundary


@pytest.mark.parametrize("fragmentation, seen", [(1.03, 1.015), (1.1, 1.03), (1.02, 1.02)])
def test_an_answer_that_runs_out_is_searched_down_to_within_the_tolerance_of_the_boundary(monkeypatch, fragmentation,
                                                                                          seen):
    calls, boundary = _fake_simulation(monkeypatch, fragmentation, seen)
    result = confirm.search(TARGET)
    analytic = result["analytic_max_seq_len"]
    assert boundary < analytic and calls[0] == analytic
    assert result["resolved"] and result["max_seq_len"] <= boundary < result["fails_at"] <= analytic
    assert result["fails_at"] - result["max_seq_len"] <= math.floor(confirm.TOLERANCE * result["fails_at"])
    assert len(calls) == len(result["probes"]) <= confirm.MAX_SIMULATIONS
    # every probe is said as the simulation said it, and the answer's bytes are its own probe's
    assert all(p["fits"] == (p["seq_len"] <= boundary) for p in result["probes"])
    assert result["device_bytes"] == next(p["device_bytes"] for p in result["probes"]
                                          if p["seq_len"] == result["max_seq_len"]) <= card_bytes(16)


def test_far_past_the_boundary_the_search_still_ends_below_it(monkeypatch):
    # fragmentation of a fifth, of which a failed request sees a twentieth: guesses go down twice as far each time
    calls, boundary = _fake_simulation(monkeypatch, 1.2, 1.05)
    result = confirm.search(TARGET)
    assert result["resolved"] and 0 < result["max_seq_len"] <= boundary < result["fails_at"]
    assert len(calls) <= confirm.MAX_SIMULATIONS


def test_where_nothing_is_found_to_fit_the_search_says_so_and_never_asks_for_less_than_the_shortest(monkeypatch,
                                                                                                  tmp_path):
    calls, _ = _fake_simulation(monkeypatch, 5.0, 5.0)  # five times the analytic bytes: nothing fits
    outcome, said = confirm.confirm_one(TARGET, tmp_path, None)
    assert outcome == "searched" and "nothing found to fit" in said
    assert min(calls) >= confirm.SHORTEST and len(calls) == confirm.MAX_SIMULATIONS
    # the table keeps the analytic answer for it, with the confirmation that says the simulation ran out
    found = setup(TARGET.experiment, TARGET.model, TARGET.overrides)
    analytic = longest_sequence(found, 16)
    answer, confirmation = confirm.confirmed_answer(found, TARGET, analytic, tmp_path)
    assert answer == analytic and not confirmation["resolved"]
    assert confirmation["max_seq_len"] == 0 and confirmation["fails_at"] == min(calls)


def test_an_answer_the_simulation_holds_stands_after_one_step(monkeypatch):
    calls, _ = _fake_simulation(monkeypatch, 1.0, 1.0)
    result = confirm.search(TARGET)
    assert calls == [result["analytic_max_seq_len"]] == [result["max_seq_len"]]
    assert result["fails_at"] is None and result["resolved"]


def test_an_answer_the_context_ends_is_not_confirmed_for_the_table_but_checked_when_asked(monkeypatch, tmp_path):
    calls, _ = _fake_simulation(monkeypatch, 1.0, 1.0)
    held = confirm.Target(EXPERIMENTS / "qlora.yaml", "llama-2-7b", {"gradient_checkpointing": True}, 24)
    assert confirm.confirm_one(held, tmp_path, None) == ("", "") and calls == []  # 4,096 tokens, the model's context
    result = confirm.search(held)  # what `--solve` asks: the step at the context is simulated too
    assert calls == [4096] and result["max_seq_len"] == 4096 and result["fails_at"] is None and result["resolved"]


def test_solve_gives_the_fit_tables_answer_read_from_its_confirmation_or_searched_the_same_way(monkeypatch, tmp_path):
    from harness.predict.solve import describe, solve

    calls, _ = _fake_simulation(monkeypatch, 1.03, 1.015)
    assert confirm.confirm_one(TARGET, tmp_path, None)[0] == "searched"
    (path,) = (tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json")
    stored, searched = json.loads(path.read_text()), len(calls)
    assert stored["fails_at"] is not None  # the analytic answer ran out: the answer lies below it

    def solved(out_dir):
        return solve(TARGET.experiment, TARGET.model, 16, "seq_len", overrides=TARGET.overrides, out_dir=out_dir)
    read = solved(tmp_path)
    assert len(calls) == searched  # read, not simulated again
    assert read["method"] == "simulated" and read["simulated"]["read_from"] == str(path)
    assert (read["max_seq_len"], read["simulated"]["fails_at"], read["device_bytes"]) == (
        stored["max_seq_len"], stored["fails_at"], stored["device_bytes"])
    assert read["analytic"]["value"] == stored["analytic_max_seq_len"] > read["max_seq_len"]
    said = describe(read)
    assert f"{stored['fails_at']:,} tokens: runs out of the card (simulated)" in said and str(path) in said
    # where the table holds no confirmation, the same search runs now, to the same answer, and writes nothing
    elsewhere = tmp_path / "elsewhere"
    searched_now = solved(elsewhere)
    assert len(calls) == 2 * searched and searched_now["simulated"]["read_from"] is None and not elsewhere.exists()
    assert searched_now["max_seq_len"] == stored["max_seq_len"] and searched_now["simulated"]["fails_at"] == stored["fails_at"]
    assert f"{len(calls) - searched} simulated steps" in describe(searched_now)


@pytest.mark.parametrize("seq_len", [None, 256])  # its longest sequence at micro-batch 1; its largest micro-batch at 256
def test_the_search_on_a_real_simulation_brackets_the_boundary(tmp_path, seq_len):
    model = _small_llama(tmp_path)
    target = confirm.Target(EXPERIMENTS / "qlora.yaml", model, {"gradient_checkpointing": True}, 2, seq_len=seq_len)
    result = confirm.search(target)
    value, analytic = f"max_{target.axis}", f"analytic_max_{target.axis}"
    assert result is not None and result["resolved"] and 0 < result[value] <= result[analytic]
    assert result["axis"] == target.axis
    found = setup(target.experiment, model, target.overrides)
    cap, allocator_cap = card_bytes(2), card_cap_bytes(2, found.config.technique, found.unified_bytes)

    def simulated(n):
        return simulate_under_card(target.experiment, model, *target.shape(n), target.overrides, "cuda", cap,
                                   allocator_cap)
    assert simulated(result[value]).fits
    if result["fails_at"] is not None:
        assert not simulated(result["fails_at"]).fits
        assert result["fails_at"] - result[value] <= max(1, math.floor(confirm.TOLERANCE * result["fails_at"]))


def test_a_micro_batch_that_runs_out_is_searched_down_to_the_one_below_it_and_the_fit_table_takes_it(monkeypatch,
                                                                                                     tmp_path):
    from harness.predict.fit_table import FIT_MICRO_BATCH_SEQ_LEN, fit_table

    calls, _ = _fake_simulation(monkeypatch, 1.2, 1.05)
    found = setup(TARGET.experiment, TARGET.model, TARGET.overrides)
    boundary = largest_fitting(lambda n: int(found.device(FIT_MICRO_BATCH_SEQ_LEN, n) * 1.2), card_bytes(16),
                               1 << 16).value
    target = replace(TARGET, seq_len=FIT_MICRO_BATCH_SEQ_LEN)
    outcome, said = confirm.confirm_one(target, tmp_path, None)
    assert outcome == "searched" and f"micro-batch at sequence {FIT_MICRO_BATCH_SEQ_LEN:,}" in said
    assert set(calls) == {FIT_MICRO_BATCH_SEQ_LEN}  # the sequence stays; the micro-batch is searched
    (path,) = (tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json")
    result = json.loads(path.read_text())
    assert f"__s{FIT_MICRO_BATCH_SEQ_LEN}__" in path.name and result["axis"] == "micro_batch"
    assert result["seq_len"] == FIT_MICRO_BATCH_SEQ_LEN and "max_seq_len" not in result
    # a whole number: the answer is the boundary itself, with the one above it seen to run out
    assert 0 < result["max_micro_batch"] == boundary < result["analytic_max_micro_batch"]
    assert result["fails_at"] == boundary + 1 and result["resolved"] and not confirm.unsettled(result)
    assert all(p["fits"] == (p["micro_batch"] <= boundary) for p in result["probes"])
    assert confirm.confirm_one(target, tmp_path, None) == ("", "")  # resumed: not again
    # the fit table's row takes it for its micro-batch, its longest sequence still the formula's; its speed follows
    rows = {(r["model"], r["experiment"], r["gradient_checkpointing"], r["card_gb"]): r
            for r in fit_table(EXPERIMENTS, out_dir=tmp_path).rows}
    row = rows["mistral-7b", "qlora", True, 16]
    assert row["micro_batch_method"] == "simulated" and row["max_micro_batch"] == boundary
    assert row["analytic_max_micro_batch"] == result["analytic_max_micro_batch"]
    assert row["simulated_micro_batch_fails_at"] == boundary + 1 and row["seq_len_method"] == "analytic"
    assert row["micro_batch_device_bytes"] == result["device_bytes"] <= card_bytes(16)
    assert row["speed_shape"] == [FIT_MICRO_BATCH_SEQ_LEN, boundary]
    assert all(r["micro_batch_method"] == "analytic" for key, r in rows.items() if key != ("mistral-7b", "qlora", True, 16))
    # the report marks it, and counts it apart from the longest sequences
    assert _micro_batch_text(row) == f"{boundary}{SIMULATED_MARK}"
    assert _micro_batch_text(rows["mistral-7b", "qlora", False, 16]).isdigit()
    table = {"rows": list(rows.values())}
    assert confirmed_counts(table, "micro_batch")[0] == 1 and confirmed_counts(table)[0] == 0


def test_the_targets_are_the_longest_sequences_then_with_expandable_segments_then_the_micro_batches():
    from harness.predict.fit_table import FIT_CARDS, FIT_MICRO_BATCH_SEQ_LEN, confirmation_targets

    targets = confirmation_targets(EXPERIMENTS)
    kinds = [("expandable" if t.allocator != "default" else "micro-batch" if t.seq_len else "sequence") for t in targets]
    assert kinds == sorted(kinds, key=["sequence", "expandable", "micro-batch"].index)  # in that order, each whole
    batches = [t for t in targets if t.seq_len]
    assert {t.seq_len for t in batches} == {FIT_MICRO_BATCH_SEQ_LEN} and {t.allocator for t in batches} == {"default"}
    assert [t.card_gb for t in batches] == sorted(t.card_gb for t in batches) and batches[0].card_gb == min(FIT_CARDS)
    assert len(batches) == kinds.count("expandable")  # one micro-batch answer per row, as one expandable answer


def test_a_confirmation_is_kept_resumed_and_used_only_by_the_predictor_that_made_it(monkeypatch, tmp_path, capsys):
    calls, boundary = _fake_simulation(monkeypatch, 1.03, 1.015)
    outcome, said = confirm.confirm_one(TARGET, tmp_path, None)
    assert outcome == "searched" and "runs out at" in said and calls
    (path,) = (tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json")
    searched = len(calls)
    assert confirm.confirm_one(TARGET, tmp_path, None) == ("", "") and len(calls) == searched  # resumed: not again
    # qlora-gc.yaml is qlora with checkpointing set: the same step, the same confirmation
    same = setup(EXPERIMENTS / "qlora-gc.yaml", TARGET.model)
    answer, confirmation = confirm.confirmed_answer(same, TARGET, longest_sequence(same, 16), tmp_path)
    assert answer.value == confirmation["max_seq_len"] <= boundary and answer.limited_by == "card"
    assert answer.peak_bytes <= card_bytes(16) < answer.next_peak_bytes
    # another predictor's confirmation, or a file that is not one, leaves the analytic answer
    analytic = longest_sequence(same, 16)
    path.write_text(json.dumps({**json.loads(path.read_text()), "predictor": "0" * 12}))
    assert confirm.confirmed_answer(same, TARGET, analytic, tmp_path) == (analytic, None)
    path.write_text("{not json")
    assert confirm.confirmed_answer(same, TARGET, analytic, tmp_path) == (analytic, None)
    assert str(path) in capsys.readouterr().out
    # past the time budget nothing starts, and it says so; a search that fails is said, not raised
    assert confirm.confirm_one(TARGET, tmp_path, deadline=0.0)[0] == "late"

    def broken(*args):
        raise ValueError("no such kernel")
    monkeypatch.setattr(confirm, "simulate_under_card", broken)
    outcome, said = confirm.confirm_one(TARGET, tmp_path / "elsewhere", None)
    assert outcome == "failed" and "ValueError: no such kernel" in said
    assert not (tmp_path / "elsewhere" / confirm.CONFIRMED_FOLDER).exists()


def test_the_fit_table_takes_a_current_confirmation_and_says_which_method_answered(monkeypatch, tmp_path):
    from harness.predict.fit_table import fit_table

    calls, boundary = _fake_simulation(monkeypatch, 1.03, 1.015)
    confirm.confirm_one(TARGET, tmp_path, None)
    table = fit_table(EXPERIMENTS, out_dir=tmp_path)
    rows = {(r["model"], r["experiment"], r["gradient_checkpointing"], r["card_gb"]): r for r in table.rows}
    row = rows["mistral-7b", "qlora", True, 16]
    assert row["seq_len_method"] == "simulated" and row["max_seq_len"] <= boundary < row["analytic_max_seq_len"]
    assert row["device_bytes"] + row["margin_bytes"] == card_bytes(16) and row["margin_bytes"] >= 0
    assert all(int(seq) <= row["max_seq_len"] for seq in row["device_bytes_at"])
    others = [r for key, r in rows.items() if key != ("mistral-7b", "qlora", True, 16)]
    assert all(r["seq_len_method"] == "analytic" and r["simulated_fails_at"] is None for r in others)
    assert table.method == "analytic+simulated" and confirmed_counts(table.__dict__)[0] == 1
    # the report marks it and says how it was found
    assert _seq_text(row).startswith(f"{row['max_seq_len']:,}{SIMULATED_MARK}")
    assert f"the formula said {row['analytic_max_seq_len']:,}" in seq_method(row)
    assert SIMULATED_MARK not in _seq_text(rows["mistral-7b", "qlora", False, 16])


@pytest.mark.parametrize("fragmentation_before, fragmentation_now", [(1.03, 1.03), (1.03, 1.05), (1.05, 1.02)])
def test_a_search_after_a_change_starts_from_what_the_earlier_one_found(monkeypatch, fragmentation_before,
                                                                        fragmentation_now):
    calls, _ = _fake_simulation(monkeypatch, fragmentation_before, 1.015)
    before = confirm.search(TARGET)
    calls, boundary = _fake_simulation(monkeypatch, fragmentation_now, 1.015)
    now = confirm.search(TARGET, earlier=confirm.earlier_bracket_of(before))
    assert calls[0] == before["max_seq_len"] and now["earlier"]["max_seq_len"] == before["max_seq_len"]
    # the answer is found as a search from nothing would find it: within the tolerance below the boundary
    assert now["resolved"] and now["max_seq_len"] <= boundary < now["fails_at"]
    assert now["fails_at"] - now["max_seq_len"] <= math.floor(confirm.TOLERANCE * now["fails_at"])
    if fragmentation_before == fragmentation_now:  # nothing moved: the earlier bracket, simulated again, settles it
        assert calls == [before["max_seq_len"], before["fails_at"]]
        assert (now["max_seq_len"], now["fails_at"]) == (before["max_seq_len"], before["fails_at"])


def test_an_earlier_answer_that_still_fits_is_searched_up_to_the_analytic_answer(monkeypatch):
    calls, _ = _fake_simulation(monkeypatch, 1.0, 1.0)  # the analytic answer holds now
    analytic = longest_sequence(setup(TARGET.experiment, TARGET.model, TARGET.overrides), 16).value
    earlier = {"predictor": "0" * 12, "max_seq_len": analytic - 300, "fails_at": analytic - 200}
    result = confirm.search(TARGET, earlier=earlier)
    assert calls == [analytic - 300, analytic - 200, analytic]
    assert result["max_seq_len"] == analytic and result["fails_at"] is None


def test_a_search_out_of_steps_goes_on_from_its_bracket_at_the_next_run(monkeypatch, tmp_path):
    calls, boundary = _fake_simulation(monkeypatch, 1.03, 1.015)
    monkeypatch.setattr(confirm, "MAX_SIMULATIONS", 3)  # too few to come within the tolerance
    assert confirm.confirm_one(TARGET, tmp_path, None)[0] == "searched"
    (path,) = (tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json")
    first = json.loads(path.read_text())
    assert confirm.unsettled(first) and first["max_seq_len"] <= boundary < first["fails_at"]
    calls.clear()
    assert confirm.confirm_one(TARGET, tmp_path, None)[0] == "searched"  # current, but not settled: searched on
    second = json.loads(path.read_text())
    assert calls[:2] == [first["max_seq_len"], first["fails_at"]] and second["earlier"]["fails_at"] == first["fails_at"]
    assert first["max_seq_len"] <= second["max_seq_len"] <= boundary < second["fails_at"] <= first["fails_at"]
    monkeypatch.setattr(confirm, "MAX_SIMULATIONS", 10)
    confirm.confirm_one(TARGET, tmp_path, None)  # enough steps: the bracket closes
    assert not confirm.unsettled(json.loads(path.read_text()))
    calls.clear()
    assert confirm.confirm_one(TARGET, tmp_path, None) == ("", "") and not calls  # settled: never searched again
    # a search that found nothing to fit is no bracket to go on from
    assert not confirm.unsettled({**first, "resolved": False, "max_seq_len": 0})


def test_an_allocator_setting_is_its_own_answer(monkeypatch, tmp_path):
    seen = []
    calls, _ = _fake_simulation(monkeypatch, 1.0, 1.0)
    simulate = confirm.simulate_under_card
    monkeypatch.setattr(confirm, "simulate_under_card", lambda *args: seen.append(args[-1]) or simulate(*args))
    expandable = confirm.Target(TARGET.experiment, TARGET.model, TARGET.overrides, 16, allocator="expandable_segments")
    assert confirm.confirm_one(expandable, tmp_path, None)[0] == "searched" and set(seen) == {"expandable_segments"}
    (path,) = (tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json")
    assert "__expandable_segments__" in path.name and json.loads(path.read_text())["allocator"] == "expandable_segments"
    # the default allocator's answer is another file, searched on its own
    assert confirm.confirm_one(TARGET, tmp_path, None)[0] == "searched" and seen[-1] == "default"
    assert len(list((tmp_path / confirm.CONFIRMED_FOLDER).glob("*.json"))) == 2


def test_solve_and_the_fit_table_answer_with_expandable_segments_too():
    from harness.predict.fit_table import EXPANDABLE, fit_table
    from harness.predict.solve import solve

    default = solve(TARGET.experiment, TARGET.model, 16, "seq_len", overrides=TARGET.overrides, simulate=False)
    expandable = solve(TARGET.experiment, TARGET.model, 16, "seq_len", overrides=TARGET.overrides, simulate=False,
                       allocator=EXPANDABLE)
    # the analytic reserve: a ratio over the tensors by default, whole pages with expandable segments
    assert expandable["allocator"] == EXPANDABLE and expandable["max_seq_len"] > default["max_seq_len"]
    row = next(r for r in fit_table(EXPERIMENTS).rows if (r["model"], r["experiment"], r["gradient_checkpointing"],
                                                          r["card_gb"]) == ("mistral-7b", "qlora", True, 16))
    assert row["max_seq_len"] == default["max_seq_len"]
    assert row[EXPANDABLE]["max_seq_len"] == expandable["max_seq_len"]
    assert row[EXPANDABLE]["seq_len_method"] == "analytic" and row[EXPANDABLE]["margin_bytes"] >= 0


def _row(model, default, expandable, *, lowered_from=None, expandable_method="simulated"):
    return {"model": model, "experiment": "qlora", "gradient_checkpointing": True, "card_gb": 24,
            "max_seq_len": default, "seq_len_method": "simulated", "seq_len_limited_by": "card",
            "analytic_max_seq_len": lowered_from or default, "simulated_fails_at": default + 10 if lowered_from else None,
            "expandable_segments": {"max_seq_len": expandable, "seq_len_method": expandable_method,
                                    "seq_len_limited_by": "card", "analytic_max_seq_len": expandable + 100,
                                    "simulated_fails_at": None}}


def test_the_report_says_what_expandable_segments_buy_where_both_answers_are_simulated():
    from harness.report.answer import _longest_what
    from harness.report.fits import expandable_table

    rows = [_row("a", 1000, 1300, lowered_from=1200), _row("b", 1000, 1050), _row("c", 1000, 990),
            _row("d", 1000, 5000, expandable_method="analytic")]  # an analytic answer counts no fragmentation
    table, said = expandable_table({"rows": rows})
    assert [line[0].text for line in table.rows] == ["a"]  # 30% longer; b's 5% is not listed
    assert table.rows[0][4].text == "1,300" + SIMULATED_MARK and table.rows[0][5].text == "+30%"
    assert "3 of the card-limited answers" in said and "2 are longer and 1 shorter" in said
    assert "of the 1 whose default answer fragmentation lowered" in said
    assert "1,300 tokens" in _longest_what(rows[0]) and "expandable" not in _longest_what(rows[3])
    assert expandable_table({"rows": [rows[3]]}) == (None, "")
    # a card the formula fits nothing on without it: said, not set against a gain
    nothing = {**_row("e", 0, 64), "seq_len_method": "analytic"}
    table, said = expandable_table({"rows": rows + [nothing]})
    assert "e qlora + checkpointing on 24 GB (64)" in said and [line[0].text for line in table.rows] == ["a"]
