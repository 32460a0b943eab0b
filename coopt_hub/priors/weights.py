"""Where the published weights of a prior come from: huggingface.co, or the hub named by
`--weights-endpoint` / COOPT_HUB_WEIGHTS_ENDPOINT (a mirror, or an embedded hub the weights were put
into with `coopt-hub hub import-model`), whatever hub the collaboration itself runs on.

open_clip and timm call huggingface_hub without an endpoint, so left alone they would fetch weights
from HF_ENDPOINT, the collaboration's hub, which holds no model repos. HF_ENDPOINT must stay as it is
(every other call of this process goes there), so the files are downloaded here, with the weights
endpoint given explicitly, into the usual hf cache, and the libraries are handed local files.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from coopt_hub._env import endpoint_is_huggingface
from coopt_hub.errors import ConfigError, PriorError
from coopt_hub.priors.base import first_lines

WEIGHTS_ENDPOINT_ENV = "COOPT_HUB_WEIGHTS_ENDPOINT"
# The collaboration's token is for the collaboration's hub; another hub gets this one or none.
WEIGHTS_TOKEN_ENV = "COOPT_HUB_WEIGHTS_TOKEN"
HUGGINGFACE_ENDPOINT = "https://huggingface.co"
# A hub that answers at all answers a HEAD at once; a closed port or an unknown host fails within it.
REACH_TIMEOUT_S = 5.0
# The next step when a downloaded weights file does not load.
REDOWNLOAD = ("Delete the file named above and rerun to download it again; if it fails the same way, the weights "
              "endpoint serves other weights under that repo id.")
# The safetensors twin that open_clip and timm each prefer to a pickled weights file.
_SAFE_TWINS = {"open_clip_pytorch_model.bin": "open_clip_model.safetensors", "pytorch_model.bin": "model.safetensors"}


@dataclass(frozen=True)
class WeightsSource:
    """A hub to download weights from, and the token it gets (False: none at all)."""

    endpoint: str
    token: str | bool | None = None

    @classmethod
    def from_environment(cls) -> WeightsSource:
        """COOPT_HUB_WEIGHTS_ENDPOINT, else huggingface.co; never HF_ENDPOINT."""
        from huggingface_hub import constants

        endpoint = (os.environ.get(WEIGHTS_ENDPOINT_ENV) or HUGGINGFACE_ENDPOINT).rstrip("/")
        token = os.environ.get(WEIGHTS_TOKEN_ENV)
        if token:
            return cls(endpoint, token)
        # The saved login and HF_TOKEN belong to the collaboration's hub: sent elsewhere they would
        # leak, and huggingface.co refuses even public files to a token it does not know.
        return cls(endpoint, None if endpoint == constants.ENDPOINT.rstrip("/") else False)

    @property
    def is_huggingface(self) -> bool:
        return endpoint_is_huggingface(self.endpoint)


def use_weights_endpoint(endpoint: str) -> None:
    """Make `endpoint` the weights endpoint of this process (what --weights-endpoint sets), checked now."""
    if not endpoint.startswith(("http://", "https://")):
        raise ConfigError(f"The weights endpoint must be an http(s) URL, got {endpoint!r}.",
                          hint=f"Pass e.g. --weights-endpoint {HUGGINGFACE_ENDPOINT} or http://127.0.0.1:8765.")
    os.environ[WEIGHTS_ENDPOINT_ENV] = endpoint.rstrip("/")


@dataclass(frozen=True)
class ModelFiles:
    """A model's files in the local hf cache, all from one commit of its repo (so in one folder)."""

    folder: Path
    weights: Path


def safetensors_first(filename: str) -> tuple[str, ...]:
    """The names to try for a weights file, its safetensors twin first, as open_clip and timm try them."""
    twin = _SAFE_TWINS.get(filename)
    if twin is None and filename.endswith((".bin", ".pth")):
        twin = filename[:-4] + ".safetensors"
    return (twin, filename) if twin else (filename,)


@dataclass(frozen=True)
class ModelRepo:
    """A model repo whose files a prior needs, and how errors speak of it."""

    repo_id: str
    failed: str  # how an error begins: "The openai weights of ViT-B-32 could not be downloaded"
    revision: str | None = None
    # Another way to the same weights once they are on this machine, e.g. "--model ViT-B-32 --checkpoint PATH".
    local_copy: str | None = None


def fetch_model_files(repo: ModelRepo, weights: Sequence[str], config: str | None = None,
                      source: WeightsSource | None = None) -> ModelFiles:
    """Download `config` (if any) and the first of `weights` that the repo holds, from the weights endpoint;
    PriorError names the URL that failed and what to do.

    Files already in the hf cache are used when the endpoint cannot be reached, or offline (HF_HUB_OFFLINE).
    """
    fetch = _Fetch(repo, source or WeightsSource.from_environment())
    revision = repo.revision
    if config is not None:
        # The weights come from the commit the config came from, even if the repo moves on meanwhile.
        revision = _snapshot(fetch(config, revision), config).name
    for name in weights:
        path = fetch(name, revision, optional=True)
        if path is not None:
            return ModelFiles(folder=_snapshot(path, name), weights=path)
    if fetch.cache_only:
        raise fetch.failure(None, weights[-1], revision)
    raise fetch.failure(f"none of {', '.join(weights)} is in {repo.repo_id} at {fetch.source.endpoint}",
                        weights[-1], revision)


def _snapshot(path: Path, filename: str) -> Path:
    """The cache folder of the commit a downloaded file belongs to (its path there is `filename`)."""
    return path.parents[len(Path(filename).parts) - 1]


class _Fetch:
    """Downloads of one model repo's files, and their failures said in words."""

    def __init__(self, repo: ModelRepo, source: WeightsSource):
        from huggingface_hub import constants

        self.repo, self.source = repo, source
        # Why only the cache can serve: offline, or the endpoint does not answer (asked once, for seconds at
        # most, where huggingface_hub would retry a refused connection for 20 s before it looks in the cache).
        self.offline = constants.is_offline_mode()
        self.cache_only = "offline: HF_HUB_OFFLINE is set" if self.offline else _unreachable(source)

    def __call__(self, filename: str, revision: str | None, optional: bool = False) -> Path | None:
        import httpx2
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            RemoteEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        repo_id, endpoint = self.repo.repo_id, self.source.endpoint
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=endpoint,
                                        token=self.source.token, local_files_only=self.cache_only is not None))
        except RemoteEntryNotFoundError:
            if optional:
                return None
            raise self.failure(f"{repo_id} at {endpoint} has no file {filename}", filename, revision) from None
        except LocalEntryNotFoundError as err:
            if optional and self.cache_only:  # this candidate was never downloaded; another may have been
                return None
            raise self.failure(None, filename, revision, err) from err
        except GatedRepoError as err:
            raise self.failure(f"{repo_id} at {endpoint} is gated: only accounts granted access may download it",
                               filename, revision) from err
        except RepositoryNotFoundError as err:
            raise self.failure(f"{endpoint} has no model repo {repo_id} (or it is private)", filename,
                               revision) from err
        except RevisionNotFoundError as err:
            raise self.failure(f"{repo_id} at {endpoint} has no revision {revision}", filename, revision) from err
        except HfHubHTTPError as err:
            raise self.failure(f"{endpoint} refused it ({first_lines(err)})", filename, revision) from err
        except httpx2.TransportError as err:
            raise self.failure(None, filename, revision, err) from err

    def failure(self, problem: str | None, filename: str, revision: str | None,
                err: BaseException | None = None) -> PriorError:
        """The error for `problem` with the file's URL; None: the endpoint could not be reached and the
        cache does not hold the file."""
        from huggingface_hub import hf_hub_url

        url = hf_hub_url(self.repo.repo_id, filename, revision=revision, endpoint=self.source.endpoint)
        if problem is not None:
            return PriorError(f"{self.repo.failed}: {problem} ({url}).",
                              hint=self._missing_hint())
        reason = self.cache_only or (first_lines(err) if err is not None else "no answer")
        return PriorError(f"{self.repo.failed}: {self.source.endpoint} cannot be reached "
                          f"({reason}) and the local hf cache does not hold {url}.", hint=self._unreachable_hint())

    def _unreachable_hint(self) -> str:
        repo_id, endpoint = self.repo.repo_id, self.source.endpoint
        offline = f"unset HF_HUB_OFFLINE to download {repo_id} from {endpoint}; if it cannot be reached, " \
            if self.offline else ""
        if not self.source.is_huggingface:
            hint = (f"{offline}start the hub at {endpoint} (`coopt-hub hub serve`) or pass a --weights-endpoint "
                    f"that is up; without --weights-endpoint and {WEIGHTS_ENDPOINT_ENV}, weights come from "
                    "huggingface.co.")
        else:
            local_copy = f", or pass its weights file with {self.repo.local_copy}" if self.repo.local_copy else ""
            hint = (f"{offline}on a machine that reaches huggingface.co run `hf download {repo_id} --local-dir DIR` "
                    f"and copy DIR here; then put it into your hub with `coopt-hub hub import-model {repo_id} --from "
                    f"DIR --endpoint URL` and pass --weights-endpoint URL{local_copy}.")
        return hint[0].upper() + hint[1:]

    def _missing_hint(self) -> str:
        repo_id = self.repo.repo_id
        if self.source.is_huggingface:
            return (f"Check the model name; a private or gated repo needs {WEIGHTS_TOKEN_ENV} set to a token "
                    "that can read it.")
        return (f"Put the repo into that hub: `coopt-hub hub import-model {repo_id} --from DIR --endpoint "
                f"{self.source.endpoint}` (DIR from `hf download {repo_id} --local-dir DIR` where huggingface.co "
                f"is reachable), or leave out --weights-endpoint and {WEIGHTS_ENDPOINT_ENV} to download from "
                "huggingface.co.")


def _unreachable(source: WeightsSource) -> str | None:
    """Why the endpoint cannot be reached (one try, seconds at most), or None when it answers."""
    import httpx2
    from huggingface_hub import get_session

    try:
        get_session().head(source.endpoint, timeout=REACH_TIMEOUT_S)
    except httpx2.TransportError as err:
        return first_lines(err) or type(err).__name__
    return None
