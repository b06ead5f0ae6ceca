"""Publishing an export folder to a Hugging Face dataset repo: what can be checked before anything is written,
and the upload, whose failure leaves the written export in place and says how to push it later."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fsspec.core import url_to_fs

from polite.errors import UserError
from tasks.export import SUCCESS


class HubPushError(UserError, RuntimeError):
    """A push that cannot start (checked before writing) or that failed (the export is written locally)."""


def check_hub_push(repo_id: str) -> None:
    """What can be known before writing anything: the repo id's shape, offline mode, a token."""
    from huggingface_hub import get_token
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    from polite.env import hub_offline

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise HubPushError(f"--push-to-hub {repo_id!r} is not a Hub repo id: {exc}") from None
    if repo_id.count("/") != 1:
        raise HubPushError(f"--push-to-hub {repo_id!r}: give the dataset repo as user/name (or org/name)")
    if hub_offline():  # read now, not when huggingface_hub was imported
        raise HubPushError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it, or export "
                           "without --push-to-hub and upload later with `hf upload`")  # fmt: skip
    if get_token() is None:
        raise HubPushError("--push-to-hub: no Hugging Face token found; run `hf auth login` (or set HF_TOKEN)")


def push_folder_to_hub(folder: str, repo_id: str, private: bool = True, api: Any = None) -> str:
    """Upload an export folder (with its README.md dataset card) to a Hub dataset repo; returns its URL.

    ``api`` is a ``huggingface_hub.HfApi`` (the default) or anything with the same two methods. A failure
    of the Hub or the network is a HubPushError that says how to push the written folder later.
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi()
    from huggingface_hub.errors import HfHubHTTPError

    # HfHubHTTPError derives from its HTTP library's base error (requests' is an OSError, httpx's is not): that
    # base is what a refused connection raises, so it is caught with the Hub's own errors
    network_errors = (OSError, ValueError, *HfHubHTTPError.__bases__)
    local = Path(url_to_fs(folder)[1])
    try:
        api.create_repo(repo_id=repo_id, repo_type="dataset", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(local),
            repo_id=repo_id,
            repo_type="dataset",
            commit_message="Polite Flamingo export",
            ignore_patterns=[SUCCESS, ".tmp-*"],
        )
    except network_errors as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise HubPushError(
            f"push to {repo_id} failed ({type(exc).__name__}: {reason}); the export is written and recorded at "
            f"{local}; push it later with: hf upload {repo_id} {local} --repo-type dataset --exclude {SUCCESS}"
            + (" --private" if private else "")
        ) from exc
    return f"https://huggingface.co/datasets/{repo_id}"
