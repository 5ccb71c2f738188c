"""A model named by its Hugging Face Hub id (`--model meta-llama/Llama-3.1-8B`): its `config.json`, and nothing else,
read from the user's Hugging Face cache, or fetched into it through `huggingface_hub` when the cache lacks it. The
cached copy is used as it is (a model's shape does not change between revisions of its config); delete it from the
cache, or pass the file, to read a newer one.

huggingface_hub already does what a hand-written fetch would get wrong: the shared cache layout other tools fill
(`~/.cache/huggingface/hub`, `HF_HUB_CACHE`), `HF_HUB_OFFLINE`, tokens for gated repositories (`HF_TOKEN`, `hf auth
login`), mirrors (`HF_ENDPOINT`) and a fall-back to the cached copy when the Hub cannot be reached. Errors become
InputError naming the id and the cache that was looked in.
"""

from __future__ import annotations

import re
from pathlib import Path

from api.errors import InputError

# The Hub's repository ids: an owner and a name of letters, digits, '-', '_' and '.' (huggingface_hub's
# `validate_repo_id`), with no '..' and no leading or trailing '.' or '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]*[A-Za-z0-9])?$")


def looks_like_hub_id(value: str) -> bool:
    """`owner/name` that is not a file path: a Hub id (what the user means when no such file exists)."""
    return bool(_HUB_ID.match(value)) and ".." not in value and not Path(value).exists()


def hub_config_path(repo_id: str) -> Path:
    """The cached `config.json` of `repo_id`, downloaded first if the Hub can be reached and the cache lacks it."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    cache = constants.HF_HUB_CACHE
    cached = try_to_load_from_cache(repo_id, "config.json")
    if isinstance(cached, str):  # no network round trip (and none of its retries) for a model seen before
        return Path(cached)
    try:
        return Path(hf_hub_download(repo_id, "config.json"))
    except GatedRepoError:
        raise InputError(
            f"--model {repo_id}: a gated repository on the Hugging Face Hub; accept its licence on the Hub and set "
            "HF_TOKEN (or run `hf auth login`), or pass a local config.json"
        ) from None
    except RepositoryNotFoundError:
        raise InputError(
            f"--model {repo_id}: no such repository on the Hugging Face Hub (or it is private: set HF_TOKEN), "
            "and no preset or file by that name"
        ) from None
    except LocalEntryNotFoundError:
        raise InputError(
            f"--model {repo_id}: the Hugging Face Hub cannot be reached and its config.json is not in the cache "
            f"{cache}; download it where there is a network (`hf download {repo_id} config.json`), point "
            "HF_HUB_CACHE at a cache that holds it, or pass a local config.json"
        ) from None
    except HfHubHTTPError as exc:
        raise InputError(f"--model {repo_id}: the Hugging Face Hub answered: {exc}") from None
