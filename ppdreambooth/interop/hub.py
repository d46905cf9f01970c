"""Publishing the final model to the Hugging Face hub (never checkpoints, logs or hidden files)."""
from __future__ import annotations

import os
from typing import Optional

from ppdreambooth.runtime.checkpoints import CHECKPOINT_PREFIX


def push_to_hub(output_dir: str, repo_id: Optional[str] = None, token: Optional[str] = None) -> str:
    """Upload the final pipeline (not checkpoints or logs) to a Hugging Face hub model repository."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    repo_id = api.create_repo(repo_id, exist_ok=True).repo_id
    api.upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        ignore_patterns=[f"{CHECKPOINT_PREFIX}-*", "logs/*", ".*"],
        commit_message="ppdreambooth: upload fine-tuned model",
    )
    return repo_id
