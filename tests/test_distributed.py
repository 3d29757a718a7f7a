"""Meta-training on 2 processes (gloo, CPU): the same outer steps as one process; a killed run resumes.

The weights after each of the first ``STEPS_COMPARED`` outer steps of a 2-process run equal a one-process
run's with the same meta-batch within ``|a - b| <= ATOL * step + RTOL |b|`` (float32: the ranks' shares are
summed in another order, and Adam magnifies the float noise of near-zero gradients), the averaged
meta-gradients within ``GRAD_ATOL + GRAD_RTOL |g|``; the two ranks' weights are identical to the bit. A
2-process run killed with SIGKILL and resumed with ``--resume`` ends with exactly the metrics of an
uninterrupted 2-process run.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from conftest import kill_after_saved_state, tiny_overrides
from safetensors.torch import load_file, save_file

from pdmer.config import load_config
from pdmer.training.state import STATE_FILE

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # two-process training runs
RTOL, ATOL = (
    1e-5,
    1e-5,
)  # weights after step k: ATOL * k + RTOL |w| (ATOL: a hundredth of an Adam step at outer_lr=1e-3)
# Later steps drift apart chaotically: Adam turns the float noise of null gradients into +-outer_lr steps,
# and their rounding spreads (measured: the first convolution's gradient differs by 3 % at step 4 of 8).
STEPS_COMPARED = 3
OUTER_LR = 1e-3  # the experiments' train.outer_lr
GRAD_RTOL, GRAD_ATOL = 1e-4, 1e-5  # the averaged meta-gradient before each step

CASES = {  # (experiment, overrides, iterations): tasks_per_batch=3 so the two shares differ (2 + 1 tasks)
    "pdmer": ("pdmer.synthetic.dsaml", [], 8),
    "pdmer-batched-second-order": (
        "pdmer.synthetic.dsaml",
        ["meta.batch_tasks=true", "meta.first_order=false", "meta.generic_loss_weight=0.5"],
        3,
    ),
    "dmer": ("dmer.synthetic.dsaml", [], 3),
}


def overrides(tmp: Path, case: str, out: str) -> list[str]:
    _, extra, iterations = CASES[case]
    ov = [
        o for o in tiny_overrides(tmp, "distributed") if not o.startswith(("runtime.out_dir=", "meta.tasks_per_batch="))
    ]
    return ov + [
        "meta.tasks_per_batch=3",
        "model.dropout=0",
        f"train.iterations={iterations}",
        "train.eval_every=2",
        "runtime.threads=1",
        "eval.plot=false",
        f"runtime.out_dir={tmp / out}",
        *extra,
    ]


def _recording(out: Path, tag: str):
    """Patch pdmer.training.loop.outer_step to save the weights after each step into ``out/<tag>.safetensors``."""
    import pdmer.training.loop as t

    step, snaps = t.outer_step, {}

    def recorded(model, optimizer, sampler, loss_fn, cfg, iteration):
        state = model.state_dict()
        null = [p for k, p in model.named_parameters() if _null_gradient(k, state)]
        adam_step = optimizer.step

        def without_null_gradients(*args, **kwargs):  # see _null_gradient
            for p in null:
                p.grad = None
            return adam_step(*args, **kwargs)

        optimizer.step = without_null_gradients
        try:
            res = step(model, optimizer, sampler, loss_fn, cfg, iteration)
        finally:
            optimizer.step = adam_step
        snaps.update({f"{iteration}/{k}": v.detach().clone() for k, v in model.state_dict().items()})
        snaps.update(
            {f"{iteration}/grad.{k}": p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
        )
        save_file(snaps, str(out / f"{tag}.safetensors"))
        return res

    t.outer_step = recorded
    return step


def _rank(rank: int, world: int, port: int, name: str, ov: list[str], out: str) -> None:
    """One spawned rank, with the environment torchrun would give it."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)
    )
    from pdmer.training import train

    _recording(Path(out), f"rank{rank}")
    train(load_config(name, ov))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _snapshots(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    out: dict[int, dict[str, torch.Tensor]] = {}
    for k, v in load_file(str(path)).items():
        it, name = k.split("/", 1)
        out.setdefault(int(it), {})[name] = v
    return out


def metrics_of(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text())
    return {"test": res["test"], "best_iteration": res["best"]["iteration"], "best_value": res["best"]["value"]}


@pytest.fixture(scope="module")
def runs(session_tmp):
    """Per case: the one-process run (in this process) and the spawned 2-process run, with their weights."""
    import pdmer.training.loop as t

    out = {}
    for case, (name, _, _) in CASES.items():
        rec = session_tmp / f"distributed-weights-{case}"
        rec.mkdir()
        step = _recording(rec, "single")
        try:
            single = t.train(load_config(name, overrides(session_tmp, case, f"runs-dist-single-{case}")))
        finally:
            t.outer_step = step
        ov = overrides(session_tmp, case, f"runs-dist-two-{case}")
        mp.spawn(_rank, args=(2, _free_port(), name, ov, str(rec)), nprocs=2, join=True)
        two = session_tmp / f"runs-dist-two-{case}" / single.name
        out[case] = {
            "single": single,
            "two": two,
            "weights": {k: _snapshots(rec / f"{k}.safetensors") for k in ("single", "rank0", "rank1")},
        }
    return out


def _null_gradient(name: str, state: dict) -> bool:
    """Is ``name``'s gradient zero in exact arithmetic? Known by the model's structure: a bias right
    before a BatchNorm (which removes any per-channel constant) and attention's key bias (a constant
    added to every key's score of one query)."""
    if name.endswith("attention.key.bias"):
        return True
    prefix, _, last = name.rpartition(".")
    module, _, index = prefix.rpartition(".")
    return last == "bias" and index.isdigit() and f"{module}.{int(index) + 1}.running_mean" in state


@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_take_the_one_process_steps(runs, case):
    w = runs[case]["weights"]
    iterations = CASES[case][2]
    assert sorted(w["single"]) == sorted(w["rank0"]) == sorted(w["rank1"]) == list(range(1, iterations + 1))
    # A gradient that is zero in exact arithmetic holds float noise, which Adam's first step turns into
    # +-outer_lr, and the rounding of those steps spreads to every weight within a step or two (how fast
    # varies between machines). Such parameters change no output, so both runs leave them as they were
    # (_recording drops their gradients before the optimiser's step); the rest must then agree.
    null = {k for k in w["single"][1] if _null_gradient(k, w["single"][1])}
    assert 0 < len(null) < 6, null
    for k in null:
        assert f"grad.{k}" not in w["single"][1]
        assert all(torch.equal(w[run][it][k], w["single"][1][k]) for run in w for it in w[run]), k
    worst = 0.0
    for it in range(1, min(iterations, STEPS_COMPARED) + 1):
        for k, ref in w["single"][it].items():
            got = w["rank0"][it][k]
            where = f"{k}, step {it}"
            assert torch.equal(got, w["rank1"][it][k]), f"ranks differ in {k} after step {it}"
            if k.startswith("grad."):
                torch.testing.assert_close(
                    got, ref, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=lambda m, where=where: f"{where}: {m}"
                )
            elif k.endswith("running_mean"):  # follows the null-gradient biases before it: within their drift
                torch.testing.assert_close(
                    got, ref, rtol=0, atol=OUTER_LR * it, msg=lambda m, where=where: f"{where}: {m}"
                )
            else:
                torch.testing.assert_close(
                    got, ref, rtol=RTOL, atol=ATOL * it, msg=lambda m, where=where: f"{where}: {m}"
                )
                if ref.is_floating_point():
                    worst = max(worst, float(((got - ref).abs() / (ref.abs() + ATOL)).max()))
    print(f"{case}: largest relative difference {worst:.2g}")
    two = runs[case]["two"]
    assert (two / "results.json").is_file()
    assert metrics_of(two)["best_iteration"] == metrics_of(runs[case]["single"])["best_iteration"]


def test_killed_two_process_run_resumes(session_tmp):
    """torchrun, 2 processes, killed (SIGKILL to all) after a saved state, resumed: the uninterrupted run's metrics.

    The reference is an uninterrupted torchrun run, not the fixture's spawned one: that one is recorded
    (:func:`_recording` keeps the null-gradient parameters still), these two train as users do.
    """
    name = CASES["pdmer"][0]

    def command(out: str) -> list[str]:
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        return [*torchrun, "run.py", "train", name, *overrides(session_tmp, "pdmer", out)]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    whole = subprocess.run(
        command("runs-dist-uninterrupted"), cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert whole.returncode == 0, whole.stderr[-3000:]
    reference = Path(whole.stdout.split("run folder: ", 1)[1].splitlines()[0])
    cmd = command("runs-dist-killed")
    run = session_tmp / "runs-dist-killed" / reference.name
    killed_at = kill_after_saved_state(cmd, run / STATE_FILE, 2, env, with_descendants=True)  # both ranks, torchrun
    assert 2 <= killed_at < CASES["pdmer"][2] and not (run / "results.json").exists()
    done = subprocess.run(cmd + ["--resume"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (run / "train.log").read_text()
    assert f"resumed {run.name} from iteration {killed_at}" in log and "distributed: 2 processes (gloo)" in log
    assert metrics_of(run) == metrics_of(reference)
    assert done.stdout.count("run folder:") == 1  # rank 0 alone reports
