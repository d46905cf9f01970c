"""Folder checks before anything is written: the output folder can be written, and no folder the run writes to
(the output folder, class-image folders) is or lies inside a folder of the subject's photos, so that the user's
photo folders are never written to by any path. Two concepts may share a class folder only for the same class
prompt (its images are generated from that prompt)."""
from __future__ import annotations

import errno
import os
from typing import Dict, List, Tuple

from ppdreambooth.errors import ConfigError


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(path))


def _within(path: str, folder: str) -> bool:
    """`path` is `folder` or lies inside it (both already resolved)."""
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_folders_apart(concepts, output_dir: str, class_images: bool) -> None:
    """Refuse overlapping folders: --output_dir equal to or inside an instance or class folder, a class folder
    equal to or inside an instance folder, and one class folder with two class prompts."""
    output = _real(output_dir)
    instance: List[Tuple[str, str]] = [(c.instance_data_dir, _real(c.instance_data_dir)) for c in concepts]
    classes: List[Tuple[str, str, str]] = [(c.class_data_dir, _real(c.class_data_dir), c.class_prompt)
                                           for c in concepts if class_images and c.class_data_dir]
    for given, real in instance:
        if _within(output, real):
            raise ConfigError(f"--output_dir {output_dir} is {'the' if output == real else 'inside the'} photo folder "
                              f"{given}: checkpoints and the model would be written among your photos. Choose an "
                              "--output_dir outside it.")
        for class_given, class_real, _ in classes:
            if _within(class_real, real):
                raise ConfigError(f"--class_data_dir {class_given} is {'the' if class_real == real else 'inside the'} "
                                  f"photo folder {given}: class images would be generated among the subject's photos. "
                                  "Give the class images a folder of their own.")
    for class_given, class_real, _ in classes:
        if os.path.exists(class_real) and not os.path.isdir(class_real):
            raise ConfigError(f"--class_data_dir {class_given} is a file, not a folder: point it at a folder for the "
                              "class images (it is created if missing).")
        if _within(output, class_real):
            raise ConfigError(f"--output_dir {output_dir} is {'the' if output == class_real else 'inside the'} class "
                              f"folder {class_given}: choose an --output_dir outside it.")
    prompts: Dict[str, Tuple[str, str]] = {}
    for class_given, class_real, prompt in classes:
        if class_real in prompts and prompts[class_real][1] != prompt:
            raise ConfigError(f"two concepts share the class folder {class_given} with different class prompts "
                              f"({prompts[class_real][1]!r} and {prompt!r}): its images would answer only one of "
                              "them. Give each class prompt its own class_data_dir.")
        prompts.setdefault(class_real, (class_given, prompt))


def check_writable(output_dir: str) -> None:
    """Refuse an --output_dir that cannot be written (read-only mount, no permission, a full disk) before any
    model loads: create it if needed, write and remove a small probe file, and remove a folder created here."""
    existed = os.path.isdir(output_dir)
    probe = os.path.join(output_dir, f".ppdreambooth-write-probe-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
        os.remove(probe)
        error = None
    except OSError as e:
        error = e
    finally:
        if os.path.exists(probe):
            os.remove(probe)
        if not existed and os.path.isdir(output_dir) and not os.listdir(output_dir):
            os.rmdir(output_dir)  # the run lock makes it again; a refused run leaves nothing behind
    if error is not None:
        raise ConfigError(f"--output_dir {output_dir} cannot be written ({describe_os_error(error)}): choose a "
                          "folder you can write to, with room for checkpoints.")


def describe_os_error(error: OSError) -> str:
    """`no space left on device`, `permission denied`, ...: the reason in words, without the traceback."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "operation not permitted"}
    return reasons.get(error.errno, error.strerror or str(error)).lower()
