"""A participant the platform does not control writes whatever it likes into its shard files.

Every header field with a wrong type or an out-of-range value, oversized and deeply nested headers,
huge integers, markdown and HTML in every string: the one header reader refuses them with a reason
that names the field (no TypeError, OverflowError, RecursionError or AttributeError escapes), and
status, verify and merge name the shard and the reason and exit with coopt-hub's error. What a
participant writes reaches a card or a commit title only as plain text, and a local checkpoint only
as its file name and weight fingerprint.
"""

from __future__ import annotations

import copy
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from cli_run import run_main
from fakes import PIXEL_MODEL, FakePrior
from safetensors import safe_open
from safetensors.numpy import save_file

from coopt_hub.core.align import select_alignment
from coopt_hub.core.layout import (
    ANCHORS_FILE,
    MANIFEST_PATH,
    PLAN_PATH,
    TARGETS_FILE,
    remote_paths,
)
from coopt_hub.core.manifest import Manifest
from coopt_hub.core.plan import Plan, Unit, make_plan
from coopt_hub.core.shardfile import (
    HEADER_KEY,
    MAX_COOPT_HEADER_BYTES,
    SCHEMA_VERSION,
    HeaderError,
    ShardHeader,
    header_from_file_header,
    header_from_metadata,
    header_problems,
    parse_json,
    plain_text,
    read_shard,
)
from coopt_hub.errors import ShardFileError
from coopt_hub.hub.client import MAX_DOCUMENT_BYTES, MAX_DOCUMENT_DEPTH
from coopt_hub.hub.repo import load_plan, read_remote_header
from coopt_hub.platform.card import render_card
from coopt_hub.priors.spec import prior_label

FIXTURES = Path(__file__).parent / "fixtures"
DEEP = 200_000  # levels of nesting: far beyond json's recursion limit
# Markdown and HTML that would add a heading, a link, an image or an HTML element to a card.
HOSTILE = ("# Heading", "[link](https://evil.example)", "![image](https://evil.example/x.png)",
           "<img src=x onerror=alert(1)>", "<!-- unclosed", "<script>alert(1)</script>", "a | b\n## c")
# All of them that fit on one line, as a prior's name.
HOSTILE_NAME = " ".join(text for text in HOSTILE if "\n" not in text)


def good_header() -> dict:
    """A valid header of this version with every optional part filled: a reference, a fit, a precision."""
    rng = np.random.default_rng(0)
    fit = select_alignment(rng.standard_normal((12, 4)), rng.standard_normal((12, 4)), folds=2)
    return ShardHeader(
        shard=1, plan_hash="a" * 64, source_revision="b" * 40,
        prior={"model": "ViT-S-32", "pretrained": None, "checkpoint": None, "seed": 0, "image_size": None},
        preprocessing={"image_size": [32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic",
                       "resize_mode": "shortest", "fill_color": 0},
        fingerprint="c" * 64, output_dim=6, dim=4, uniformity=-1.5,
        reference={"shard": 0, "branch": "shard/0", "commit": "d" * 40, "fingerprint": "e" * 64},
        residual=fit.residual, num_rows=3, tool_version="0.1.0", checksums={"targets/raw": "f" * 64},
        skipped_ids=[5], schema_version=SCHEMA_VERSION, alignment=fit.to_dict(), uniformity_native=-1.25,
        projection="random", precision="bf16",
        precision_deviation={"max_cosine_distance": 0.01, "mean_cosine_distance": 0.002, "anchors": 12},
    ).to_dict()


def changed(header: dict, path: str, value) -> dict:
    """`header` with the field at dotted `path` set to `value` (a new key where there was none)."""
    data = copy.deepcopy(header)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[key]
    node[last] = value
    return data


def with_nesting(header: dict, path: str, depth: int = DEEP) -> str:
    """`header` as JSON with `depth` nested lists at `path` (json.dumps itself cannot write them)."""
    return json.dumps(changed(header, path, "@nest@")).replace('"@nest@"', "[" * depth + "]" * depth)


# (field, bad value): a wrong type or range in every field of the header, and in nested ones.
BAD_FIELDS = [
    ("shard", "1"), ("shard", -1), ("shard", 2**70), ("shard", True), ("shard", 1.0),
    ("plan_hash", 12345), ("plan_hash", "<b>" * 20),
    ("source_revision", None), ("source_revision", ["b" * 40]),
    ("prior", ["x"]), ("prior", "ViT-S-32"), ("prior.model", 7), ("prior.model", ""), ("prior.model", "x" * 201),
    ("prior.model", "timm:"), ("prior", {"model": "m", "pretrained": "openai", "checkpoint": "w.pt"}),
    ("prior.model", "net\n## heading"), ("prior.model", "\x1b[31mred"), ("prior.pretrained", "tag\u202eevil"),
    ("prior.seed", 10**30), ("prior.seed", "0"), ("prior.image_size", 0), ("prior.image_size", 65536), ("prior.weights", "/home/alice/w.pt"),
    ("preprocessing", "bicubic"), ("preprocessing.image_size", [32]), ("preprocessing.mean", [float("nan")] * 3),
    ("preprocessing.std", "0.5"), ("preprocessing.fill_color", 10**5), ("preprocessing.crop_pct", 2.0),
    ("fingerprint", 5), ("fingerprint", {"sha": 1}),
    ("output_dim", 0), ("output_dim", 1.5), ("output_dim", 2**64), ("dim", "8"), ("dim", None),
    ("uniformity", "0.1"), ("uniformity", float("inf")), ("uniformity", float("nan")), ("uniformity", 10**400),
    ("reference", "shard/0"), ("reference", {"shard": 0}), ("reference.commit", 12345),
    ("reference.shard", 2**63),
    ("residual", -1.0), ("residual", None), ("residual", [0.1]),
    ("num_rows", 2**80), ("num_rows", "3"),
    ("tool_version", 0.1), ("tool_version", "1.0 beta"),
    ("checksums", []), ("checksums", {"targets/raw": 5}), ("checksums", {"targets/../x": "f" * 64}),
    ("checksums", {f"targets/t{i}": "f" * 64 for i in range(17)}),
    ("skipped_ids", [2**70]), ("skipped_ids", [10**30]), ("skipped_ids", "1,2"), ("skipped_ids", [1.5]),
    ("skipped_ids", [[1]]), ("skipped_ids", [-1]), ("skipped_ids", [3, 1]),
    ("schema_version", "3"), ("schema_version", 0), ("schema_version", SCHEMA_VERSION + 1),
    ("alignment", "ridge"), ("alignment.method", "cubic"), ("alignment.params", {"ridge": "1"}),
    ("alignment.params", {"ridge": 1e300}), ("alignment.cv_residual", None), ("alignment.folds", 2**40),
    ("alignment.candidates", [{}]), ("alignment.candidates", "all"), ("alignment.extra", 1),
    ("uniformity_native", "x"),
    ("projection", 5), ("projection", "umap"),
    ("precision", "fp8"), ("precision", None),
    ("precision_deviation", 0.01), ("precision_deviation.max_cosine_distance", "0"),
    ("precision_deviation.anchors", 0), ("precision_deviation.mean_cosine_distance", float("inf")),
    ("evil", 1),
    *(("fingerprint", text) for text in HOSTILE), *(("tool_version", text) for text in HOSTILE),
    *(("reference.branch", text) for text in HOSTILE), ("alignment.method", HOSTILE[3]),
]


@pytest.mark.parametrize(("field", "value"), BAD_FIELDS, ids=[f"{f}={str(v)[:20]!r}" for f, v in BAD_FIELDS])
def test_a_bad_field_is_refused_with_a_reason_that_names_it(field, value):
    bad = changed(good_header(), field, value)
    outer = json.dumps({"__metadata__": {HEADER_KEY: json.dumps(bad)}}).encode()
    for read in (lambda: header_from_metadata({HEADER_KEY: json.dumps(bad)}), lambda: header_from_file_header(outer)):
        with pytest.raises(HeaderError) as caught:
            read()
        message = str(caught.value)
        assert field.split(".")[0] in message, f"the reason does not name the field: {message}"
        assert not set("<>!#|`\n") & set(message), f"the reason carries markup: {message}"


def test_the_good_header_and_older_versions_read():
    header = header_from_metadata({HEADER_KEY: json.dumps(good_header())})
    assert header.precision == "bf16" and header.alignment["method"], "a valid header was refused"
    # A model name is chosen by a person: printable text of any kind reads, and is escaped where shown.
    named = header_from_metadata({HEADER_KEY: json.dumps(changed(good_header(), "prior.model", HOSTILE_NAME))})
    assert named.prior["model"] == HOSTILE_NAME
    read_shard(FIXTURES / "v1" / "shards" / "1", verify=True)  # coopt-hub 0.1.0's files


def test_a_reference_the_plan_does_not_have_makes_the_shard_unusable():
    units = [Unit("data/train.parquet", g, 30 * g, 30) for g in range(4)]
    plan = make_plan(source_repo="org/src", source_revision="b" * 40, split="train", image_column="image",
                     units=units, num_shards=2, anchors=6, dim=4, seed=0, temperature=2.0)
    header = header_from_metadata({HEADER_KEY: json.dumps(changed(good_header(), "reference.shard", 99))})
    assert "aligned to shard 99, the plan has 2" in header_problems(plan, 1, header)


def test_a_checkpoint_path_in_a_header_is_read_as_its_file_name():
    """Headers written before local paths were removed still read, without the path."""
    data = changed(good_header(), "prior.checkpoint", "/home/alice/tmp/p0 final.safetensors")
    header = header_from_metadata({HEADER_KEY: json.dumps(data)})
    assert header.prior["checkpoint"] == "p0_final.safetensors", header.prior
    windows = changed(good_header(), "prior.checkpoint", "C:\\Users\\alice\\p0.pt")
    assert header_from_metadata({HEADER_KEY: json.dumps(windows)}).prior["checkpoint"] == "p0.pt"
    folder = changed(good_header(), "prior.model", "timm:local-dir:/home/alice/models/vit")
    assert header_from_metadata({HEADER_KEY: json.dumps(folder)}).prior["model"] == "timm:local-dir:vit"


@pytest.mark.parametrize("where", ["coopt header", "field", "safetensors header"])
def test_deeply_nested_json_is_refused_before_it_is_parsed(where):
    coopt = with_nesting(good_header(), "prior.model")
    if where == "coopt header":
        coopt = "[" * DEEP + "]" * DEEP
    outer = json.dumps({"__metadata__": {HEADER_KEY: coopt}}).encode()
    if where == "safetensors header":
        outer = b'{"__metadata__": {}, "x": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    with pytest.raises(HeaderError, match=r"nests \d+ levels deep, more than the 8 allowed"):
        header_from_file_header(outer)


# Brackets inside strings, after escaped quotes and escaped backslashes: none of them nest.
@pytest.mark.parametrize("text", ['{"a": "[[[[", "b": [1]}', r'["\\", "[[{{"]', r'["\"[[[[", ["\\\"]]]", "\\"]]'])
def test_brackets_in_strings_are_no_nesting(text):
    assert parse_json(text, "it", 1000, max_depth=2) == json.loads(text)


def test_oversized_headers_are_refused_before_they_are_parsed():
    data = changed(good_header(), "skipped_ids", list(range(10**6)))
    with pytest.raises(HeaderError, match=f"more than the {MAX_COOPT_HEADER_BYTES} allowed"):
        header_from_metadata({HEADER_KEY: json.dumps(data)})
    with pytest.raises(HeaderError, match="skipped_ids holds 250000 items"):
        header_from_metadata({HEADER_KEY: json.dumps(changed(good_header(), "skipped_ids", list(range(250_000))))})


def test_a_shard_file_with_a_deeply_nested_header_is_a_shard_file_error(tmp_path):
    header = b'{"__metadata__": {"coopt": "{}"}, "ids": ' + b"[" * DEEP + b"]" * DEEP + b"}"
    for name in (TARGETS_FILE, ANCHORS_FILE):
        (tmp_path / name).write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(ShardFileError, match=r"nests \d+ levels deep"):
        read_shard(tmp_path)


# Participant strings in cards and titles ---------------------------------------------------------


def rendered_elements(card: str) -> dict[str, list[str]]:
    """The headings, links, images and HTML of a card's body as markdown-it renders it (HTML allowed)."""
    from markdown_it import MarkdownIt

    body = card.split("\n---\n", 1)[1]  # after the YAML block
    tokens = MarkdownIt("commonmark", {"html": True}).enable("table").parse(body)
    found: dict[str, list[str]] = {"heading": [], "link": [], "image": [], "html": []}
    for i, token in enumerate(tokens):
        if token.type == "heading_open":
            found["heading"].append(tokens[i + 1].content)
        if token.type == "html_block":
            found["html"].append(token.content)
        for child in token.children or []:
            kind = {"link_open": "link", "image": "image", "html_inline": "html"}.get(child.type)
            if kind:
                found[kind].append(str(child.attrs.get("href", child.attrs.get("src", child.content))))
    return found


def hostile_manifest(text: str) -> Manifest:
    """coopt-hub 0.1.0's manifest with `text` in every string a participant chose, as if a header had
    carried it past the reader: the card must show it as plain text all the same."""
    data = json.loads((FIXTURES / "v1" / "manifest.json").read_text())
    for record in (data["reference"], data["shards"][0]):
        record["prior"] = {"model": f"ViT {text}", "pretrained": None, "checkpoint": f"/home/alice/{text}.pt",
                           "seed": 0, "image_size": None}
        record["fingerprint"] = text
    data["shards"][0]["alignment"] = {"method": text, "cv_residual": 0.5}
    return Manifest.from_dict(data)


def render(manifest: Manifest) -> str:
    from datasets import Features, Sequence, Value

    units = [Unit("data/train-00000-of-00001.parquet", None, 0, 8)]
    plan = make_plan(source_repo="org/src", source_revision="b" * 40, split="train", image_column="image",
                     units=units, num_shards=2, anchors=3, dim=4, seed=0, temperature=2.0)
    features = Features({"id": Value("int64"), "target": Sequence(Value("float32"), length=4)})
    return render_card(manifest, plan, features, {"license": "mit"}, "org/x-coopt")


def test_markdown_and_html_in_participant_strings_stay_text_in_the_card():
    clean = rendered_elements(render(hostile_manifest("plain")))
    assert clean["link"] == ["https://arxiv.org/abs/2505.14117", "/datasets/org/src", "#target-quality"], \
        "the source is not linked by repo id on the same hub"
    assert not clean["image"] and not clean["html"], clean
    for text in HOSTILE:
        card = render(hostile_manifest(text))
        assert rendered_elements(card) == clean, f"{text!r} added markup to the card"
        assert "alice" not in card, "a local path reached the card"


@pytest.mark.parametrize("text", HOSTILE)
def test_plain_text_and_prior_labels_carry_no_markup(text):
    for shown in (plain_text(text), prior_label({"model": text}), prior_label({"model": "m", "checkpoint": text})):
        assert not set("<>[]!#|`\n") & set(shown), shown
    label = prior_label({"model": "ViT-S-32", "checkpoint": "/home/alice/tmp/p0.safetensors"}, "ab12" * 16)
    assert label == "ViT-S-32 (p0.safetensors, weights ab12ab12ab12)", label


# End to end, through the command line ------------------------------------------------------------


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


@pytest.fixture(scope="module")
def collab(new_collaboration, small_source, fake_backends, tmp_path_factory, work):
    """2 shards of 120 digits; shard 0 labeled by `optimize` with a checkpoint in a home folder."""
    collab = new_collaboration(small_source, "malicious", shards=2, anchors=32, dim=8)
    home = tmp_path_factory.mktemp("home") / "alice" / "tmp"
    home.mkdir(parents=True)
    (home / "p0.safetensors").write_bytes(b"weights the pixel prior does not read")
    outcome = run_main(["optimize", collab.repo, "--shard", "0", "--model", PIXEL_MODEL, "--checkpoint",
                        str(home / "p0.safetensors"), "--push", "--workdir", str(work)])
    assert outcome.code == 0, outcome.output
    return collab


def hostile_files(header_text):
    """A `tamper` that writes `header_text(header)` as the coopt header of both files of a shard."""

    def tamper(directory: Path) -> None:
        for name in (TARGETS_FILE, ANCHORS_FILE):
            with safe_open(str(directory / name), framework="numpy") as stored:
                header = json.loads(stored.metadata()[HEADER_KEY])
                arrays = {key: stored.get_tensor(key) for key in stored.keys()}  # noqa: SIM118 - safe_open is no dict
            save_file(arrays, str(directory / name), metadata={HEADER_KEY: header_text(header)})

    return tamper


HOSTILE_SHARDS = {
    "uniformity": lambda h: json.dumps({**h, "uniformity": "0.1"}),
    "skipped_ids": lambda h: json.dumps({**h, "skipped_ids": [2**70]}),
    "fingerprint": lambda h: json.dumps({**h, "fingerprint": "<img src=x onerror=alert(1)>"}),
    "nests": lambda h: with_nesting(h, "plan_hash"),
}


@pytest.mark.parametrize("field", list(HOSTILE_SHARDS))
def test_status_verify_and_merge_name_the_invalid_shard_and_why(collab, field):
    collab.push(1, FakePrior("other-net", output_dim=20), tamper=hostile_files(HOSTILE_SHARDS[field]))
    status = run_main(["status", collab.repo])
    assert status.code == 0, status.output
    assert "shard 1: invalid:" in status.output and field in status.output, status.output
    refused = [run_main(argv) for argv in (["merge", collab.repo, "--no-evaluate"], ["verify", collab.repo, "--shard", "1"])]
    for outcome in refused:
        assert outcome.code != 0 and "shard 1" in outcome.output and field in outcome.output, outcome.output
    for outcome in (status, *refused):
        for crash in ("Traceback", "TypeError", "OverflowError", "RecursionError", "AttributeError", "KeyError"):
            assert crash not in outcome.output, outcome.output


def test_a_partial_merge_leaves_the_invalid_shard_out_and_shows_no_markup_or_path(collab, hub):
    from huggingface_hub import HfApi

    collab.push(1, FakePrior("other-net", output_dim=20), tamper=hostile_files(HOSTILE_SHARDS["uniformity"]))
    outcome = run_main(["merge", collab.repo, "--allow-partial", "--no-evaluate"])
    assert outcome.code == 0, outcome.output
    card = hub.download(collab.repo, "README.md", "v1").read_text()
    elements = rendered_elements(card)
    assert not elements["html"] and not elements["image"], elements
    assert set(elements["link"]) <= {"https://arxiv.org/abs/2505.14117", f"/datasets/{collab.source}",
                                     "#target-quality"}, elements["link"]
    assert "shard 1 had not been pushed, or was left out as stale or invalid" in card, "the card hides the gap"
    header = read_remote_header(hub, collab.repo, hub.head(collab.repo, "shard/0"), remote_paths(0).targets)
    assert header.prior["checkpoint"] == "p0.safetensors", header.prior
    assert f"pixel:net (p0.safetensors, weights {header.fingerprint[:12]})" in card, "the card's prior label"
    report = hub.download(collab.repo, remote_paths(0).report, "shard/0").read_text()
    titles = [c.title for c in HfApi().list_repo_commits(collab.repo, repo_type="dataset")]
    for text in (card, report, *titles):
        assert "alice" not in text and "/tmp/" not in text, "a local path left the participant's machine"


def test_a_prior_named_in_markdown_and_html_merges_as_plain_text(collab, hub):
    from huggingface_hub import HfApi

    collab.push(1, FakePrior(HOSTILE_NAME, output_dim=20))
    outcome = run_main(["merge", collab.repo, "--no-evaluate"])
    assert outcome.code == 0, outcome.output
    card = hub.download(collab.repo, "README.md", "v2").read_text()
    elements = rendered_elements(card)
    assert not elements["html"] and not elements["image"], elements
    assert set(elements["link"]) == {"https://arxiv.org/abs/2505.14117", f"/datasets/{collab.source}",
                                     "#target-quality"}, elements["link"]
    assert [h for h in elements["heading"] if "Heading" in h or "heading" in h] == [], elements["heading"]
    assert plain_text(HOSTILE_NAME, 200) in card, "the prior's name is not shown as plain text"
    title = HfApi().list_repo_commits(collab.repo, repo_type="dataset")[0].title
    assert not set("<>[]!#|`") & set(title), title


@pytest.mark.parametrize(("deviation", "reason"), [
    (None, "labeled in bf16 but records no deviation from an fp32 forward"),
    ({"max_cosine_distance": 0.05, "mean_cosine_distance": 0.01, "anchors": 32},
     "deviate from an fp32 forward by a cosine distance of up to 0.0500 on 32 anchors, above the 0.02 tolerance"),
])
def test_verify_fails_a_reduced_precision_shard_without_a_deviation_within_tolerance(collab, deviation, reason):
    precision = {"precision": "bf16", "precision_deviation": deviation}
    collab.push(1, FakePrior("other-net", output_dim=20), tamper=hostile_files(lambda h: json.dumps({**h, **precision})))
    outcome = run_main(["verify", collab.repo, "--shard", "1"])
    assert outcome.code != 0 and reason in " ".join(outcome.output.split()), outcome.output


def test_a_reduced_precision_shard_is_compared_at_its_tolerance():
    from coopt_hub.platform.verify import Thresholds, at_precision

    assert at_precision(Thresholds(), "fp32") == Thresholds(), "fp32 keeps the threshold"
    assert at_precision(Thresholds(), "bf16").min_cosine == pytest.approx(0.98), "bf16: 1 - its tolerance"
    assert at_precision(Thresholds(min_cosine=0.9), "fp16").min_cosine == 0.9, "a lower threshold stays"


def test_a_pull_request_names_a_checkpoint_by_file_name_and_fingerprint_only(collab, work, hub):
    from huggingface_hub import HfApi

    outcome = run_main(["push", collab.repo, "--shard", "0", "--create-pr", "--workdir", str(work)])
    assert outcome.code == 0, outcome.output
    api = HfApi()
    (pull,) = [d for d in api.get_repo_discussions(collab.repo, repo_type="dataset") if d.is_pull_request]
    details = api.get_discussion_details(collab.repo, pull.num, repo_type="dataset")
    text = " ".join([details.title, *(getattr(event, "content", "") or "" for event in details.events)])
    assert "p0.safetensors" in text and "alice" not in text and "/tmp/" not in text, text


def test_a_deeply_nested_participant_report_is_a_shard_file_error_not_a_crash(collab, hub):
    from huggingface_hub import HfApi

    path, branch = remote_paths(1).report, "hostile-report"  # its own branch: main stays as the other tests left it
    api = HfApi()
    api.create_branch(collab.repo, repo_type="dataset", branch=branch, exist_ok=True)
    api.upload_file(path_or_fileobj=("[" * DEEP + "]" * DEEP).encode(), path_in_repo=path, repo_id=collab.repo,
                    repo_type="dataset", revision=branch, commit_message="a report nested to exhaust recursion")
    with pytest.raises(ShardFileError, match=f"{path} at .* is not usable JSON"):
        hub.read_json(collab.repo, path, branch)


# Participant JSON documents read through the Hub client --------------------------------------------


def published(hf_api, repo: str, files: dict[str, bytes]) -> str:
    """A new repo holding `files` in one commit; the commit's id."""
    from huggingface_hub import CommitOperationAdd

    hf_api.create_repo(repo, repo_type="dataset")
    return hf_api.create_commit(repo, [CommitOperationAdd(path, data) for path, data in files.items()],
                                commit_message="documents a participant wrote", repo_type="dataset").oid


@pytest.mark.parametrize("path", [remote_paths(1).report, MANIFEST_PATH])
def test_a_deeply_nested_document_is_refused_before_it_is_parsed(hub, hf_api, repo_id, monkeypatch, path):
    commit = published(hf_api, repo_id, {path: ("[" * DEEP + "]" * DEEP).encode()})
    downloads = []
    download = hub.download
    monkeypatch.setattr(hub, "download", lambda *args: downloads.append(args) or download(*args))
    with pytest.raises(ShardFileError, match=f"{path} at {commit[:12]} of {repo_id} is not usable JSON: "
                       f"it nests {DEEP} levels deep, more than the {MAX_DOCUMENT_DEPTH} allowed") as raised:
        hub.read_json(repo_id, path, commit)
    assert raised.value.hint and "push it again" in raised.value.hint, raised.value.hint
    assert len(downloads) == 1, downloads


def test_an_oversized_document_is_refused_before_it_is_read(hub, hf_api, repo_id):
    size = MAX_DOCUMENT_BYTES + 1
    commit = published(hf_api, repo_id, {MANIFEST_PATH: b'"' + b"a" * (size - 2) + b'"'})
    with pytest.raises(ShardFileError, match=f"{MANIFEST_PATH} at {commit[:12]} of {repo_id} is not usable JSON: "
                       f"it takes {size} bytes, more than the {MAX_DOCUMENT_BYTES} allowed"):
        hub.read_json(repo_id, MANIFEST_PATH, commit)


def test_a_plan_of_100k_row_groups_and_100k_anchors_reads(hub, hf_api, repo_id):
    units = tuple(Unit(file=f"data/train-{i // 10:05d}-of-10000.parquet", row_group=i % 10, start=i * 1000,
                       num_rows=1000) for i in range(100_000))
    plan = Plan(source_repo="org/large-source", source_revision="a" * 40, split="train", image_column="image",
                num_rows=10**8, num_shards=64, seed=0, dim=512, temperature=0.07, granularity="row_group",
                units=units, unit_shards=tuple(i % 64 for i in range(len(units))),
                anchor_ids=tuple(range(0, 10**8, 1000)))
    text = plan.to_json().encode()
    assert len(text) > 13_000_000, len(text)
    commit = published(hf_api, repo_id, {PLAN_PATH: text})
    assert load_plan(hub, repo_id, commit) == plan
