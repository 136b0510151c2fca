"""Hub revisions (ID@REV, --revision) and Hub errors, without network and without mocks: models resolve offline from
a real huggingface_hub cache built here (blobs, snapshot links, refs holding commit hashes), and what needs the Hub
to answer (no such revision, gated, private, the token sent) goes to a local HTTP server that answers as the Hub
does, through the real huggingface_hub and datasets clients."""

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from orionlm import OrionError, load_model
from orionlm.cli import main
from orionlm.config import preset
from orionlm.convert.hf import save_hf
from orionlm.convert.peft import save_adapter
from orionlm.errors import split_revision, with_revision
from orionlm.loading import adapter_base_name, resolve_model_path
from orionlm.merge.sources import open_source
from orionlm.model import OrionLM
from orionlm.nn.lora import LoRAConfig, apply_lora
from orionlm.tokenizer import Tokenizer

REPO = "org/tiny"
# revision -> layers of the model it holds; main is the default
REVISIONS = {"main": 2, "v2": 1, "release/x": 1}


def add_snapshot(cache: Path, repo: str, model_dir: Path, refs: list[str]) -> str:
    """Put a model directory into a huggingface_hub cache as a download leaves it: each file a blob named by its
    hash, the snapshot's files links to the blobs, refs/REF holding the commit hash. Returns the commit hash."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    files = sorted(model_dir.iterdir())
    commit = hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()
    for file in files:
        data = file.read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = folder / "snapshots" / commit / file.name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (folder / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (folder / "refs" / ref).write_text(commit)
    return commit


@pytest.fixture(scope="module")
def hub_cache(tmp_path_factory) -> tuple[Path, dict[str, OrionLM], dict[str, str]]:
    """A Hub cache holding org/tiny: main a 2-layer model, v2 and release/x a 1-layer one (Hugging Face
    directories as orionlm exports them); with the models and the commit hash of each ref."""
    root = tmp_path_factory.mktemp("hub")
    models, commits = {}, {}
    for layers, refs in ((2, ["main"]), (1, ["v2", "release/x"])):
        model = OrionLM(preset("tiny-dense", num_layers=layers))
        model.reset_parameters(seed=layers)
        save_hf(model, Tokenizer.byte_level(), root / f"export{layers}")
        commit = add_snapshot(root / "cache", REPO, root / f"export{layers}", refs)
        models |= {ref: model for ref in refs}
        commits |= {ref: commit for ref in refs}
    return root / "cache", models, commits


@pytest.fixture
def offline_hub(hub_cache, monkeypatch):
    """HF_HUB_CACHE and HF_HUB_OFFLINE=1 set, in the environment and in what huggingface_hub read from it when
    it was imported."""
    cache = hub_cache[0]
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return hub_cache


def test_a_revision_loads_its_own_snapshot(offline_hub):
    _, models, commits = offline_hub
    for name, ref in [(f"{REPO}@release/x", "release/x"), (f"{REPO}@{commits['main']}", "main"),
                      (f"{REPO}@{commits['v2']}", "v2")]:  # fmt: skip
        assert resolve_model_path(name).name == commits[ref], name
    for name, ref in [(REPO, "main"), (f"{REPO}@v2", "v2")]:
        model, tokenizer, _ = load_model(name, device="cpu")
        assert model.config.num_layers == REVISIONS[ref] and tokenizer is not None
        for key, value in models[ref].state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
    assert open_source(f"{REPO}@v2").config.num_layers == REVISIONS["v2"]  # what merges and moe-merge read


def test_lm_eval_takes_a_revision_as_its_own_models_do(offline_hub):
    pytest.importorskip("lm_eval")
    from orionlm.eval.harness import OrionLMHarness

    for args, ref in [({"pretrained": REPO}, "main"), ({"pretrained": REPO, "revision": "v2"}, "v2")]:
        assert OrionLMHarness(**args, device="cpu").model.config.num_layers == REVISIONS[ref]


def test_an_unknown_revision_is_one_line(offline_hub, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["info", REPO, "--revision", "v3"])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error == ("orionlm: error: org/tiny@v3: not found locally, and as a Hub id it could not be downloaded "
                     "(offline mode is on): no snapshot of revision 'v3' is in the Hub cache; check the id and "
                     "revision, or go online\n")  # fmt: skip
    with pytest.raises(OrionError, match=r"^org/tiny@: a Hub id with a revision is ID@REV"):
        resolve_model_path("org/tiny@")


def test_a_revision_of_a_local_path_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "m").mkdir(parents=True)
    with pytest.raises(OrionError, match=r"^--revision v2: runs/m is a local path, and a revision applies to Hub ids"):
        with_revision("runs/m", "v2")
    with pytest.raises(OrionError, match=r"^runs/m@v2: runs/m is a local path, and a revision \(@v2\) applies to"):
        resolve_model_path("runs/m@v2")
    with pytest.raises(OrionError, match=r"^org/tiny@v2 names its revision already; leave out --revision main"):
        with_revision("org/tiny@v2", "main")
    with pytest.raises(OrionError, match=r"^--revision v2: give the Hub id it applies to"):
        with_revision(None, "v2")
    (tmp_path / "runs" / "m@v2").mkdir()  # a local name holding '@' is a path, not a revision
    assert split_revision("runs/m@v2") == ("runs/m@v2", None)
    assert resolve_model_path("runs/m@v2") == Path("runs/m@v2")
    assert split_revision("org/tiny@refs/pr/1") == ("org/tiny", "refs/pr/1")


def test_an_adapter_keeps_its_base_revision_as_peft_does(offline_hub, tmp_path):
    """PEFT writes the base's revision in a key of its own; the adapter then loads on that revision's model."""
    _, models, _ = offline_hub
    model = OrionLM(models["v2"].config)
    model.load_state_dict(models["v2"].state_dict())
    apply_lora(model, LoRAConfig(r=2, alpha=4))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    save_adapter(model, tmp_path / "adapter", f"{REPO}@v2")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["base_model_name_or_path"], config["revision"]) == (REPO, "v2")
    assert adapter_base_name(tmp_path / "adapter") == f"{REPO}@v2"
    adapted, _, _ = load_model(tmp_path / "adapter", device="cpu")
    ids = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(adapted(ids).logits, model(ids).logits)


def test_the_command_line_reads_the_cache_the_environment_names(hub_cache):
    """The whole path through a new process: HF_HUB_CACHE and HF_HUB_OFFLINE as a user sets them."""
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache[0]), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-m", "orionlm", "info", REPO, "--revision", "v2", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["config"]["num_layers"] == REVISIONS["v2"]


class FakeHub(BaseHTTPRequestHandler):
    """Answers every request as the Hub answers for a repository it will not give: org/gated is gated (401),
    org/private does not exist for this token (401), anything else has no such revision (404). Each request's
    method, path and Authorization header are kept in `seen`."""

    seen: list[tuple[str, str, str | None]] = []

    def answer(self) -> None:
        self.seen.append((self.command, self.path, self.headers.get("authorization")))
        status, code = (401, "GatedRepo") if "org/gated" in self.path else (404, "RevisionNotFound")
        if "org/private" in self.path:
            status, code = 401, "RepoNotFound"
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = answer

    def log_message(self, *args) -> None:
        pass


# Run in a new process, where HF_ENDPOINT, HF_TOKEN and the caches come from the environment as a user sets them:
# each Hub name and what orionlm said when it failed.
FAILURES = """
import json
from orionlm import OrionError
from orionlm.data.sources import SourceConfig, load_hf_dataset
from orionlm.eval.hub import fetch
from orionlm.loading import resolve_model_path
said = {}
source = lambda name: load_hf_dataset(SourceConfig(name))
task = lambda name: fetch("arc_easy", name)
for name, load in [("org/tiny@nope", resolve_model_path), ("org/gated", resolve_model_path),
                   ("org/private", resolve_model_path), ("hf:org/texts@v1", source), ("hf:org/gated", source),
                   ("org/arc@v2", task)]:
    try:
        load(name)
    except OrionError as e:
        said[name] = str(e)
print(json.dumps(said))
"""


def test_hub_refusals_say_what_to_do_and_the_revision_and_token_reach_the_hub(tmp_path):
    """Models and datasets (`datasets` offline takes the newest cached copy whatever the revision, so a dataset's
    revision is checked where it goes: the request for the dataset at that revision)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    FakeHub.seen = []
    env = {**os.environ, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_port}", "HF_TOKEN": "hf_from_the_env",
           "HF_HOME": str(tmp_path / "hf"), "ORIONLM_CACHE": str(tmp_path / "orionlm")}  # fmt: skip
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", FAILURES], capture_output=True, text=True, env=env, timeout=120)
    server.shutdown()
    server.server_close()
    assert result.returncode == 0, result.stderr
    said = json.loads(result.stdout)
    hub = "not found locally, and as a Hub id it could not be downloaded"
    login = "log in with `hf auth login` or set HF_TOKEN"
    assert said == {
        "org/tiny@nope": f"org/tiny@nope: {hub}: it has no revision 'nope'; check the branch, tag or commit name",
        "org/gated": f"org/gated: {hub}: it is gated: accept its terms on its Hub page, then {login}",
        "org/private": f"org/private: {hub}: no such repository, or a private one (HTTP 401): check the id, or {login}",
        "hf:org/texts@v1": "source 'hf:org/texts@v1': could not load the dataset (split 'train'): it has no revision "
                           "'v1'; check the branch, tag or commit name",
        "hf:org/gated": "source 'hf:org/gated': could not load the dataset (split 'train'): Dataset 'org/gated' is a "
                        "gated dataset on the Hub. You must be authenticated to access it; check the name, or if it "
                        f"is gated or private, {login}",
        "org/arc@v2": "org/arc@v2: not found locally, and as a Hub dataset (test) it could not be downloaded: it has "
                      "no revision 'v2'; check the branch, tag or commit name",
    }  # fmt: skip
    asked = [(path, token) for _, path, token in FakeHub.seen if path.startswith(("/api/models/", "/datasets/"))]
    paths = ["/api/models/org/tiny/revision/nope", "/api/models/org/gated/revision/main",
             "/api/models/org/private/revision/main", "/datasets/org/texts/resolve/v1/README.md",
             "/datasets/org/gated/resolve/main/README.md", "/datasets/org/arc/resolve/v2/README.md"]  # fmt: skip
    assert asked == [(path, "Bearer hf_from_the_env") for path in paths]
