"""Where a model's files are: a local checkpoint directory, or a Hugging Face Hub id resolved to a snapshot.

`resolve_model` is called once, early (the CLI resolves before it starts Ray, so a bad name fails in a
second with one line); every engine calls it again, which costs nothing for a local directory. Hub ids go
through `huggingface_hub.snapshot_download`, so its cache, `HF_TOKEN`, `HF_HOME` / `HF_HUB_CACHE` and
`HF_HUB_OFFLINE` (cache only, no network) apply as they do for transformers and vLLM.
"""

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

# what the engine reads from a checkpoint: config, safetensors weights (+ index), tokenizer, chat template
CHECKPOINT_FILES = ["*.json", "*.safetensors", "*.jinja"]


def resolve_model(model: str | Path, download_dir: str | Path | None = None) -> Path:
    """The local checkpoint directory of `model` (a directory, or a Hub id such as "Qwen/Qwen3-0.6B").
    ValueError with a one-line reason when it is neither a checkpoint directory nor a model the Hub (or,
    offline, the cache) has. download_dir: the Hub cache to use (default: huggingface_hub's, $HF_HUB_CACHE)."""
    path = Path(model).expanduser()
    if path.exists() or not is_hub_id(str(model)):
        return checked_checkpoint(path, str(model))
    return checked_checkpoint(_snapshot(str(model), download_dir), str(model))


def is_hub_id(model: str) -> bool:
    """True for a string shaped like a Hub model id ("name" or "org/name") that names no local path."""
    if Path(model).expanduser().exists():
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def served_model_name(model: str | Path) -> str:
    """The `model` clients send when none is configured: a directory's name, a Hub id as given (vLLM's)."""
    return str(model) if is_hub_id(str(model)) else Path(model).name


def checked_checkpoint(path: Path, given: str) -> Path:
    if not path.exists():
        raise ValueError(f"model: {given!r} is neither a directory nor a Hugging Face model id")
    if not path.is_dir():
        raise ValueError(f"model: {given!r} is a file; a checkpoint is a directory holding config.json")
    if not (path / "config.json").is_file():
        raise ValueError(f"model: {given!r} is not a checkpoint directory (it has no config.json)")
    return path


def _snapshot(repo_id: str, download_dir: str | Path | None) -> Path:
    cache = f"the Hugging Face cache ({download_dir or constants.HF_HUB_CACHE})"
    try:
        return Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES, cache_dir=download_dir))
    except GatedRepoError:
        raise ValueError(
            f"model: {repo_id!r} is gated on the Hugging Face Hub; accept its terms there and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ValueError(
            f"model: {repo_id!r} is not a local directory, and the Hugging Face Hub has no such model "
            "(or it is private: set HF_TOKEN)"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"model: the Hugging Face Hub has no main revision of {repo_id!r}") from None
    except IncompleteSnapshotError:
        raise ValueError(
            f"model: {repo_id!r} is only partly in {cache} and the Hub could not be reached to complete it"
        ) from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub could not be reached"
        raise ValueError(f"model: {repo_id!r} is not a local directory nor in {cache}, and {why}") from None
    except OSError as e:  # any other Hub or file-system failure, in one line
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"model: cannot fetch {repo_id!r} from the Hugging Face Hub ({reason})") from None
