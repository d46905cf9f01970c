"""Running ppdreambooth (and the PyTorch client) in fresh processes, and the training command line the tests share."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_module(args, cwd=ROOT, env=None, timeout=600):
    """Run `python <args>` in a fresh process; returns the CompletedProcess (output captured)."""
    full_env = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


def client(torch_python, *args):
    """Run tests/helpers/diffusers_client.py in the PyTorch client (it never imports Paddle)."""
    script = os.path.join(ROOT, "tests", "helpers", "diffusers_client.py")
    result = subprocess.run([torch_python, script, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]


def train_argv(model, photos, out, steps=4, extra=()):
    return [
        "--pretrained_model_name_or_path", model, "--instance_data_dir", photos, "--output_dir", str(out),
        "--instance_prompt", "a photo of sks dog", "--resolution", "64", "--train_batch_size", "1",
        "--learning_rate", "1e-3", "--max_train_steps", str(steps), "--logging_steps", "1", "--seed", "7",
        "--report_to", "none", *extra,
    ]


def truncate_run_to(run_dir, step, dest):
    """A copy of a finished run as it stood right after `checkpoint-<step>` was written."""
    import shutil

    shutil.copytree(run_dir, dest)
    for name in os.listdir(dest):
        path = os.path.join(dest, name)
        keep = name.startswith("checkpoint-") and int(name.split("-")[1]) <= step
        if not keep and name != "logs":
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def client_script(torch_python, script, *args):
    """Run tests/helpers/<script> in the PyTorch client (it never imports Paddle)."""
    path = os.path.join(ROOT, "tests", "helpers", script)
    result = subprocess.run([torch_python, path, *map(str, args)], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
