"""The demo's live progress (cifhkd.progress): train_log.jsonl parsing, the status of the
trainings side by side and of the decodings, and the status line on a terminal and in a log."""

import io
import json
import time

import pytest

from cifhkd import progress


def write_log(exp, rows, tail=""):
    exp.mkdir(parents=True, exist_ok=True)
    (exp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_last_logged_skips_a_line_being_written(tmp_path):
    assert progress.last_logged(tmp_path / "none") is None
    write_log(tmp_path, [{"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.5}], tail='{"step": 30, "lo')
    assert progress.last_logged(tmp_path) == {"step": 20, "loss": 2.5}
    write_log(tmp_path, [], tail='{"step": 3')
    assert progress.last_logged(tmp_path) is None


def test_duration():
    assert [progress.duration(s) for s in (0, 42.4, 725, 3720, -3)] == ["0s", "42s", "12m05s", "1h02m", "0s"]


def append_log(exp, rows):
    with open(exp / "train_log.jsonl", "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))


def test_training_status_steps_loss_elapsed_and_time_left(tmp_path):
    cif = progress.Training("CIF", tmp_path / "cif", budget=2000)
    assert cif.status(0.0) == "CIF waiting"
    cif.begin()  # no log yet
    assert cif.log_offset == 0 and cif.status(cif.start + 5) == "CIF starting, 5s"
    write_log(tmp_path / "cif", [{"step": 10, "loss": 2.9}])
    # the first line: the rate's baseline, no estimate yet
    assert cif.status(cif.start + 10) == "CIF 10/2000 loss 2.900, 10s"
    append_log(tmp_path / "cif", [{"step": 490, "loss": 2.5}, {"step": 500, "loss": 2.3456}])
    # 490 steps in 245 s since step 10: 0.5 s a step, 1500 to go
    assert cif.status(cif.start + 255) == "CIF 500/2000 loss 2.346, 4m15s, 12m30s left"
    no_budget = progress.Training("CIF", tmp_path / "cif")
    no_budget.begin()
    append_log(tmp_path / "cif", [{"step": 501}])
    assert no_budget.status(no_budget.start + 10) == "CIF step 501, 10s"
    cif.state = "done"
    assert cif.status(0.0) == "CIF done"


def test_a_resumed_training_counts_only_the_lines_of_its_own_run(tmp_path):
    # the killed run logged up to step 450, past its last checkpoint (400), where the
    # resumed run starts again: its lines 410, 420... come after the old 450
    write_log(tmp_path / "hkd", [{"step": s, "loss": 3.0} for s in range(10, 460, 10)])
    hkd = progress.Training("CIF + HKD", tmp_path / "hkd", budget=2000)
    hkd.begin()
    assert hkd.status(hkd.start + 30) == "CIF + HKD starting, 30s"  # not step 450
    append_log(tmp_path / "hkd", [{"step": 410, "loss": 2.5}])
    assert hkd.status(hkd.start + 40) == "CIF + HKD 410/2000 loss 2.500, 40s"
    append_log(tmp_path / "hkd", [{"step": 420, "loss": 2.4}, {"step": 510, "loss": 2.0}])
    # 100 steps in 50 s since the first new line: 1490 to go
    assert hkd.status(hkd.start + 90) == "CIF + HKD 510/2000 loss 2.000, 1m30s, 12m25s left"
    # a line being written is not read
    with open(tmp_path / "hkd" / "train_log.jsonl", "a") as f:
        f.write('{"step": 520, "lo')
    assert hkd.status(hkd.start + 95).startswith("CIF + HKD 510/2000")


def test_phase_renders_the_systems_side_by_side(tmp_path):
    write_log(tmp_path / "cif", [{"step": 100, "loss": 3.0}])
    training = progress.Phase(
        "training",
        {
            "cif": progress.Training("CIF", tmp_path / "cif", 400),
            "hkd": progress.Training("CIF + HKD", tmp_path / "hkd", 400),
        },
        start=1000.0,
    )
    training.items["cif"].state, training.items["cif"].start = "running", 1000.0
    training.items["cif"].base = (0, 1000.0)  # its first line, step 0, seen at the start
    assert (
        training.render(now=1060.0) == "demo: training 1m00s | CIF 100/400 loss 3.000, 1m00s, 3m00s left | "
        "CIF + HKD waiting"
    )
    decoding = progress.Phase(
        "decoding", {"cif": progress.Decoding("CIF", 4), "hkd": progress.Decoding("CIF + HKD", 4)}, start=0.0
    )
    decoding.items["hkd"].done = 3
    assert decoding.render(now=12.0) == "demo: decoding 12s | CIF 0/4 | CIF + HKD 3/4"


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_status_line_in_a_log_prints_lines_and_messages():
    count = iter(range(1000))
    log = io.StringIO()
    with progress.StatusLine(lambda: f"status {next(count)}", log, plain_interval=0.05) as status:
        time.sleep(0.5)
        status.say("a message")
    lines = log.getvalue().splitlines()
    assert "a message" in lines and "\r" not in log.getvalue()
    shown = [line for line in lines if line != "a message"]
    assert len(shown) >= 3 and shown == [f"status {i}" for i in range(len(shown))]  # the last at the end


def test_status_line_on_a_terminal_is_rewritten_in_place():
    terminal = Terminal()
    text = {"now": "CIF 1/4"}
    with progress.StatusLine(lambda: text["now"], terminal, interval=0.01, plain_interval=60) as status:
        deadline = time.monotonic() + 10
        while "CIF 1/4" not in terminal.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        status.say("demo: training CIF")  # above the status, which is drawn again
        text["now"] = "CIF 2/4"
        time.sleep(0.05)
    out = terminal.getvalue()
    assert out.startswith("CIF 1/4\r\033[K") and "\r\033[Kdemo: training CIF\nCIF 1/4" in out
    assert out.endswith("\r\033[KCIF 2/4\n")  # the final status, kept
    assert out.count("\n") == 2  # the message, the end


def test_a_failing_render_is_logged_once_and_does_not_replace_the_exception(caplog):
    calls = []

    def render():
        calls.append(1)
        if len(calls) > 2:
            raise KeyError("render broke")
        return f"status {len(calls)}"

    log = io.StringIO()
    with pytest.raises(ValueError, match="the original error"):
        with progress.StatusLine(render, log, plain_interval=0.01):
            deadline = time.monotonic() + 10
            while len(calls) < 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.1)
            raise ValueError("the original error")
    assert len(calls) == 3  # no redrawing after the failure, not even at the end
    assert log.getvalue() == "status 1\nstatus 2\n"
    failures = [r for r in caplog.records if "status line failed" in r.getMessage()]
    assert len(failures) == 1 and "render broke" in failures[0].exc_text
