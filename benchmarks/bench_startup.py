"""Where the time from launch to the first training step goes (and what follows the last step), on the seed
README's first command with a tiny SD model (CPU).

    python benchmarks/bench_startup.py [--repeats 3] [--steps 1]

Each repeat is a fresh `python -m ppdreambooth.train`-equivalent process; the worker wraps the phases of
`ppdreambooth.train` with clocks and prints one JSON line. The table shows per-phase medians in seconds:
interpreter start and imports (Paddle, PaddleNLP, ppdiffusers: the seed script pays these too; the line
"bare stack imports" measures them alone in another fresh process), input checks, model loading, reading
photos, caching, Trainer set-up (optimizer, data loader, logging) until the first step, the first step,
the steps after it, the final save (pipeline folder, model card, summary) and the process's exit, also
measured, alternating, for the same run ending with a plain `sys.exit` (what `ppdreambooth.runtime.exiting` saves).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
from bench_seed_script import make_tiny_job, seed_command  # noqa: E402  (the same tiny job and command)
PHASES = ["interpreter + imports", "input checks", "model loading", "reading photos", "caching",
          "Trainer set-up to first step", "first step", "other steps", "final save + summary",
          "process exit", "total (launch to exit)", "process exit with plain sys.exit (for comparison)"]


def worker(launched: float, argv: list) -> dict:
    """Run the training CLI with clocks around its phases; returns {phase: seconds}."""
    import ppdreambooth.train as train_module  # noqa: the imports phase ends here
    import ppdreambooth.training.run as run_module
    from paddlenlp.trainer import TrainerCallback

    marks = {"imported": time.time()}
    spans = {}

    def clocked(owner, name, label):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.time()
            try:
                return original(*args, **kwargs)
            finally:
                spans[label] = spans.get(label, 0.0) + time.time() - start
        setattr(owner, name, wrapper)

    clocked(run_module, "check_inputs", "input checks")
    clocked(run_module, "build_model", "model loading")
    clocked(run_module, "build_dataset", "reading photos")
    clocked(run_module, "cache_encodings", "caching")
    clocked(run_module.DreamBoothTrainer, "save_model", "final save")
    clocked(run_module, "write_model_card", "model card")
    clocked(run_module, "closing_summary", "summary")

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            marks.setdefault("train_begin", time.time())

        def on_step_begin(self, args, state, control, **kwargs):
            marks.setdefault("first_step", time.time())

        def on_step_end(self, args, state, control, **kwargs):
            marks.setdefault("first_step_end", time.time())
            marks["last_step_end"] = time.time()

    trainer_init = run_module.DreamBoothTrainer.__init__

    def with_clock(self, *args, callbacks=None, **kwargs):
        marks.setdefault("trainer_built", time.time())
        trainer_init(self, *args, callbacks=[StepClock(), *(callbacks or [])], **kwargs)

    run_module.DreamBoothTrainer.__init__ = with_clock
    status = train_module.main(argv)
    if status != 0:
        raise SystemExit(f"training exited with {status}")
    end = time.time()
    before_trainer = sum(spans.get(k, 0.0) for k in ("input checks", "model loading", "reading photos", "caching"))
    return {
        "interpreter + imports": marks["imported"] - launched,
        "input checks": spans["input checks"],
        "model loading": spans["model loading"],
        "reading photos": spans["reading photos"],
        "caching": spans["caching"],
        # from the end of caching (callbacks, Trainer constructor, optimizer, data loader, VisualDL) to step 1
        "Trainer set-up to first step": marks["first_step"] - marks["imported"] - before_trainer,
        "first step": marks["first_step_end"] - marks["first_step"],
        "other steps": marks["last_step_end"] - marks["first_step_end"],
        "final save + summary": end - marks["last_step_end"],
        "ended": end,
    }


def bare_imports() -> float:
    start = time.time()
    subprocess.run([sys.executable, "-c", "import paddle, paddlenlp.trainer, ppdiffusers"], check=True,
                   capture_output=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        launched, argv, plain_exit = json.loads(args.worker)
        print(json.dumps(worker(launched, argv)), flush=True)
        if plain_exit:
            sys.exit(0)
        from ppdreambooth.runtime.exiting import exit_process

        exit_process(0)  # as the training command ends

    def launch(model, photos, folder, plain_exit: bool) -> dict:
        argv = seed_command(model, photos, os.path.join(tempfile.mkdtemp(dir=folder), "out"), args.steps)
        launched = time.time()
        result = subprocess.run([sys.executable, __file__, "--worker", json.dumps([launched, argv, plain_exit])],
                                capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=ROOT))
        if result.returncode != 0:
            raise SystemExit(f"worker failed:\n{result.stderr[-3000:]}")
        exited = time.time()
        run = json.loads(result.stdout.strip().splitlines()[-1])
        run["process exit"] = exited - run.pop("ended")
        run["total (launch to exit)"] = exited - launched
        return run

    runs, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        model, photos = make_tiny_job(tmp)
        for _ in range(args.repeats):  # the command as it ends, then the same run ending with sys.exit
            runs.append(launch(model, photos, tmp, plain_exit=False))
            runs[-1]["process exit with plain sys.exit (for comparison)"] = launch(
                model, photos, tmp, plain_exit=True)["process exit"]
            bare.append(bare_imports())
    print(f"| phase (seed command, {args.steps} step(s), median of {args.repeats}) | seconds |")
    print("| --- | --- |")
    for phase in PHASES:
        print(f"| {phase} | {statistics.median(run[phase] for run in runs):.2f} |")
    print(f"| (for scale: `python -c \"import paddle, paddlenlp.trainer, ppdiffusers\"`, launch to exit) "
          f"| {statistics.median(bare):.2f} |")


if __name__ == "__main__":
    main()
