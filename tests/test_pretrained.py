"""``create_model(name, pretrained=True)``: published weights downloaded into
torch's hub cache, reused, refused when incomplete or corrupt, loaded from a
local file or another URL, and the config's ``model.pretrained: imagenet``.

Everything runs offline against an HTTP server on 127.0.0.1 (a thread on an
ephemeral port) that serves checkpoints in Pyramid ViG's own layout (keys
``stem.*``, ``pos_embed``, ``backbone.{j}.*``, ``prediction.*``), made from a
model's weights through the authors' key layout; the default URLs of
``gkg_pyg.models.hub.PRETRAINED`` are pointed at it.
"""

import http.server
import io
import logging
import socket
import threading
from collections import Counter
from pathlib import Path

import pytest
import torch

import gkg_pyg
from gkg_pyg.builder import build_model
from gkg_pyg.config import ConfigError, load_config
from gkg_pyg.models import hub
from gkg_pyg.models.registry import get_pretrained_cfg, resolve_pretrained

CONFIGS = Path(__file__).resolve().parents[1] / "experiments" / "configs"
SMALL = dict(img_size=33, k=3)  # the smallest inputs the models take at k=3: fast to build and load
PVIG_FILE = "pvig_ti_78.5.pth.tar"
LABEL_PATH = ("label_", "head_")  # GKGNet's label path and heads: absent from a Pyramid ViG checkpoint


class Server:
    """A local HTTP server: ``routes[path] = (body, mode)`` with mode "ok" or
    "truncate" (announces the whole body, sends half, closes); ``hits``
    counts the requests per path; anything else is a 404."""

    def __init__(self):
        self.routes, self.hits = {}, Counter()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10  # seconds a connection may idle: a stuck client cannot hold the server

            def do_GET(self):
                server.hits[self.path] += 1
                if self.path not in server.routes:
                    self.send_error(404)
                    return
                body, mode = server.routes[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if mode == "truncate" else body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs=dict(poll_interval=0.05), daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_port}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def server():
    srv = Server()
    yield srv
    srv.close()


def closed_port_url(path: str = f"/{PVIG_FILE}") -> str:
    """A URL on 127.0.0.1 where nothing listens (a port just released): connection refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{path}"


@pytest.fixture
def hub_dir(tmp_path, monkeypatch, caplog):
    """torch's hub cache under tmp_path (TORCH_HOME), every default URL on a
    closed port, and the library's INFO reports in ``caplog``."""
    caplog.set_level(logging.INFO, logger="gkg_pyg")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a torch.hub.set_dir elsewhere would win over TORCH_HOME
    offline = closed_port_url()
    for tags in hub.PRETRAINED.values():
        for entry in tags.values():
            if entry["url"] is not None:
                monkeypatch.setitem(entry, "url", offline)
    return tmp_path / "torch_home" / "hub" / "checkpoints"


def randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter and BN statistic drawn from ``seed``: weights no fresh model has."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point():
                values = torch.rand(tensor.shape, generator=gen) + 0.5 if "running_var" in name else None
                tensor.copy_(values if values is not None else torch.randn(tensor.shape, generator=gen) * 0.1)
    return model


def pyramid_vig_checkpoint(model) -> dict:
    """A Pyramid ViG ImageNet checkpoint as Han et al. publish it, from a
    ``pvig_*`` model: the authors' layout of the patch path without its
    ``backbone.`` prefix (their stored position tables included), and the
    head as ``prediction.{0,1,4}`` with 1x1-convolution weights."""
    authors = gkg_pyg.export_authors_checkpoint(model)["state_dict"]
    state = {key[len("backbone.") :]: value for key, value in authors.items() if key.startswith("backbone.")}
    assert "stem.convs.0.weight" in state and any(key.startswith("backbone.") for key in state)
    for key, value in model.head_patch.state_dict().items():
        state[f"prediction.{key}"] = value[:, :, None, None] if value.dim() == 2 else value
    return {"state_dict": state}


def to_bytes(checkpoint) -> bytes:
    buffer = io.BytesIO()
    torch.save(checkpoint, buffer)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def published():
    """``(source model, its Pyramid ViG checkpoint as file bytes)``: pvig_ti with 1000 classes."""
    source = randomised(gkg_pyg.create_model("pvig_ti", num_classes=1000, **SMALL), seed=7).eval()
    return source, to_bytes(pyramid_vig_checkpoint(source))


def serve(server, monkeypatch, published, arch="pvig_ti", mode="ok", body=None) -> str:
    """Point ``arch``'s default URL at the server, serving the published checkpoint (or ``body``)."""
    path = f"/release/{PVIG_FILE}"
    server.routes[path] = (published[1] if body is None else body, mode)
    url = server.url(path)
    monkeypatch.setitem(hub.PRETRAINED[arch]["imagenet"], "url", url)
    return path


def assert_same(model, source, only=None, skip=()):
    ours, theirs = model.state_dict(), source.state_dict()
    keys = [k for k in ours if (only is None or k.startswith(only)) and not k.startswith(skip)]
    assert keys
    for key in keys:
        assert torch.equal(ours[key], theirs[key]), key


def assert_fresh(model, fresh, prefixes):
    """The tensors under ``prefixes`` are newly initialised for the model's own
    label count: a fresh model's shapes and statistics (constants equal)."""
    ours, theirs = model.state_dict(), fresh.state_dict()
    keys = [k for k in ours if k.startswith(prefixes)]
    assert keys
    for key in keys:
        a, b = ours[key].float(), theirs[key].float()
        assert a.shape == b.shape, key
        if b.numel() < 2 or b.std() == 0:
            assert torch.equal(a, b), key
        else:
            assert abs(a.std() / b.std() - 1) < 0.2 and abs(a.mean() - b.mean()) < 0.2 * b.std(), key


def left_in(folder: Path):
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_loads_the_served_weights_and_caches_them(server, hub_dir, monkeypatch, published, caplog):
    path = serve(server, monkeypatch, published)
    torch.manual_seed(0)
    fresh = gkg_pyg.create_model("pvig_ti", num_classes=1000, **SMALL)
    assert not torch.equal(fresh.stem.convs[0].weight, published[0].stem.convs[0].weight)

    model = gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.hits[path] == 1
    assert_same(model, published[0])  # every tensor, the ImageNet classifier included
    assert left_in(hub_dir) == [PVIG_FILE]  # the whole file under its published name, no temporary left
    assert (hub_dir / PVIG_FILE).read_bytes() == published[1]
    notice = [r.getMessage() for r in caplog.records if r.name == "gkg_pyg.models.hub" and r.levelno == logging.WARNING]
    assert len(notice) == 1 and server.url(path) in notice[0] and str(hub_dir / PVIG_FILE) in notice[0]  # what, where
    assert "pyramid_vig layout" in caplog.text and "pvig_ti.imagenet" in caplog.text  # the loader's report
    cfg = model.pretrained_cfg
    assert (cfg["architecture"], cfg["tag"], cfg["url"], cfg["loads"]) == (
        "pvig_ti",
        "imagenet",
        server.url(path),
        "full",
    )

    # The second call reads the cache: no request.
    again = gkg_pyg.create_model("pvig_ti", pretrained="imagenet", num_classes=1000, **SMALL)
    assert server.hits[path] == 1
    assert_same(again, published[0])

    # Another class count: all but the last layer, which stays freshly initialised.
    ten = gkg_pyg.create_model("pvig_ti.imagenet", pretrained=True, num_classes=10, **SMALL)
    assert server.hits[path] == 1
    assert_same(ten, published[0], skip="head_patch.4.")
    assert_fresh(ten, gkg_pyg.create_model("pvig_ti", num_classes=10, **SMALL), "head_patch.4.")
    assert "new classifier (1000 -> 10 classes)" in caplog.text


def test_gkgnet_takes_its_patch_path_from_the_pyramid_vig_weights(server, hub_dir, monkeypatch, published):
    path = serve(server, monkeypatch, published, arch="gkgnet_ti")
    torch.manual_seed(3)
    fresh = gkg_pyg.create_model("gkgnet_ti", num_classes=5, **SMALL)
    torch.manual_seed(3)
    model = gkg_pyg.create_model("gkgnet_ti", pretrained=True, num_classes=5, **SMALL)
    assert server.hits[path] == 1
    assert_same(model, published[0], skip=LABEL_PATH)  # stem, position embedding, every stage
    assert_same(model, fresh, only=LABEL_PATH)  # the label path and heads: as initialised
    assert model.pretrained_cfg["loads"] == "backbone" and model.pretrained_cfg["source"] == "pyramid_vig"
    # gkgnet_ti and pvig_ti share the published file, hence the cached copy.
    monkeypatch.setitem(hub.PRETRAINED["pvig_ti"]["imagenet"], "url", server.url(path))
    gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.hits[path] == 1


def test_truncated_download_leaves_nothing_in_the_cache(server, hub_dir, monkeypatch, published):
    path = serve(server, monkeypatch, published, mode="truncate")
    size = len(published[1])
    with pytest.raises(hub.PretrainedWeightsError, match=rf"incomplete: {size // 2} of {size} bytes") as err:
        gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.url(path) in str(err.value) and str(hub_dir / PVIG_FILE) in str(err.value)
    assert left_in(hub_dir) == []
    # Once the server sends it whole, the next call downloads it again.
    server.routes[path] = (published[1], "ok")
    model = gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.hits[path] == 2 and left_in(hub_dir) == [PVIG_FILE]
    assert_same(model, published[0])


@pytest.mark.parametrize(
    "body",
    [
        b"<!DOCTYPE html><html>a login page, not a checkpoint</html>",
        pytest.param(None, id="zip-without-its-end"),
    ],
)
def test_corrupt_download_is_refused_and_not_cached(server, hub_dir, monkeypatch, published, body):
    # A whole response (the announced length) whose content is no checkpoint.
    body = published[1][: len(published[1]) // 2] if body is None else body
    path = serve(server, monkeypatch, published, body=body)
    with pytest.raises(hub.PretrainedWeightsError, match="does not load, so it was not kept in the cache") as err:
        gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.url(path) in str(err.value) and str(hub_dir / PVIG_FILE) in str(err.value)
    assert left_in(hub_dir) == []


def test_corrupt_cached_file_is_removed(server, hub_dir, monkeypatch, published):
    path = serve(server, monkeypatch, published)
    hub_dir.mkdir(parents=True)
    (hub_dir / PVIG_FILE).write_bytes(published[1][:1000])  # e.g. a copy that was cut short
    with pytest.raises(hub.PretrainedWeightsError, match="do not load, so .* was removed") as err:
        gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.url(path) in str(err.value) and str(hub_dir / PVIG_FILE) in str(err.value)
    assert server.hits[path] == 0 and left_in(hub_dir) == []
    model = gkg_pyg.create_model("pvig_ti", pretrained=True, num_classes=1000, **SMALL)
    assert server.hits[path] == 1
    assert_same(model, published[0])


def test_offline_error_says_what_to_do(hub_dir):
    url = hub.PRETRAINED["gkgnet_ti"]["imagenet"]["url"]  # a closed port (the hub_dir fixture)
    with pytest.raises(hub.PretrainedWeightsError) as err:
        gkg_pyg.create_model("gkgnet_ti", pretrained=True, num_classes=5, **SMALL)
    message = str(err.value)
    for part in (
        url,
        "refused",
        str(hub_dir / PVIG_FILE),
        "Nothing was written to the cache",
        "pretrained_cfg_overlay=dict(file=",
        "model.pretrained: PATH",
    ):
        assert part in message, part
    assert left_in(hub_dir) == []


def test_http_error_is_named(server, hub_dir, published):
    with pytest.raises(hub.PretrainedWeightsError, match=r"HTTP 404") as err:
        gkg_pyg.create_model(
            "pvig_ti", pretrained=True, pretrained_cfg_overlay=dict(url=server.url("/missing.pth")), **SMALL
        )
    assert server.url("/missing.pth") in str(err.value) and str(hub_dir / "missing.pth") in str(err.value)
    assert left_in(hub_dir) == []


def test_file_overlay_loads_a_local_file_without_network(hub_dir, published, tmp_path):
    path = tmp_path / "downloaded elsewhere.pth.tar"
    path.write_bytes(published[1])
    model = gkg_pyg.create_model(
        "pvig_ti", pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=1000, **SMALL
    )  # the default URL is a closed port: any download would fail
    assert_same(model, published[0])
    assert model.pretrained_cfg["file"] == str(path) and left_in(hub_dir) == []

    with pytest.raises(FileNotFoundError, match="pretrained_cfg_overlay file not found: .*nowhere.pth"):
        gkg_pyg.create_model("pvig_ti", pretrained=True, pretrained_cfg_overlay=dict(file=tmp_path / "nowhere.pth"))
    with pytest.raises(ValueError, match="pretrained is False: pass pretrained=True"):
        gkg_pyg.create_model("pvig_ti", pretrained_cfg_overlay=dict(file=path))
    with pytest.raises(ValueError, match="unknown pretrained_cfg_overlay key 'fle'.*did you mean 'file'"):
        gkg_pyg.create_model("pvig_ti", pretrained=True, pretrained_cfg_overlay=dict(fle=path))
    # A path as pretrained= stays what it was: a checkpoint loaded strictly.
    model = gkg_pyg.create_model("pvig_ti", pretrained=str(path), num_classes=1000, **SMALL)
    assert_same(model, published[0])
    with pytest.raises(ValueError, match="prediction.4.weight"):
        gkg_pyg.create_model("pvig_ti", pretrained=str(path), num_classes=10, **SMALL)


def test_url_overlay_downloads_that_url(server, hub_dir, published):
    server.routes["/mirror/pvig_ti_mirror.pth"] = (published[1], "ok")
    url = server.url("/mirror/pvig_ti_mirror.pth")
    for _ in range(2):
        model = gkg_pyg.create_model(
            "pvig_ti", pretrained=True, pretrained_cfg_overlay=dict(url=url), num_classes=1000, **SMALL
        )
        assert_same(model, published[0])
    assert server.hits["/mirror/pvig_ti_mirror.pth"] == 1  # cached under the URL's file name
    assert left_in(hub_dir) == ["pvig_ti_mirror.pth"] and model.pretrained_cfg["url"] == url


def test_progress_bar_on_request(server, tmp_path, published, capsys):
    server.routes["/p.pth"] = (published[1], "ok")
    tmp = hub.download(server.url("/p.pth"), tmp_path / "p.pth", progress=True)
    assert tmp.read_bytes() == published[1] and tmp.name.endswith(".partial")  # the caller moves it
    assert "p.pth" in capsys.readouterr().err
    tmp = hub.download(server.url("/p.pth"), tmp_path / "p.pth", progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # GKGNet-S, built four times
def test_gkgnet_s_coco_weights_point_to_google_drive(hub_dir, tmp_path, caplog):
    for call in (
        lambda: gkg_pyg.create_model("gkgnet_s", pretrained="coco_576"),
        lambda: gkg_pyg.create_model("gkgnet_s.coco_576", pretrained=True),
    ):
        with pytest.raises(hub.PretrainedWeightsError) as err:
            call()
        message = str(err.value)
        assert hub.GKGNET_S_COCO_576_PAGE in message and "no direct download" in message
        assert "pretrained_cfg_overlay=dict(file='PATH')" in message and "model.pretrained: PATH" in message
    assert left_in(hub_dir) == []

    # The file, once downloaded by hand: a full GKGNet-S in the authors' mmcls layout, 80 COCO labels.
    source = randomised(gkg_pyg.create_model("gkgnet_s", num_classes=80, **SMALL), seed=11)
    path = tmp_path / "gkgnet_s_coco_576.pth"
    gkg_pyg.export_authors_checkpoint(source, path)
    model = gkg_pyg.create_model(
        "gkgnet_s", pretrained="coco_576", pretrained_cfg_overlay=dict(file=path), num_classes=80, **SMALL
    )
    assert_same(model, source)  # everything, label path and heads included
    assert model.pretrained_cfg["tag"] == "coco_576" and model.pretrained_cfg["source"] == "gkgnet_mmcls"
    assert "gkgnet_mmcls layout" in caplog.text
    # Fine-tuning to 20 labels: all but the label embedding and the heads.
    voc = gkg_pyg.create_model(
        "gkgnet_s", pretrained="coco_576", pretrained_cfg_overlay=dict(file=path), num_classes=20, **SMALL
    )
    reset = ("label_embed.", "head_label.", "head_patch.")
    assert_same(voc, source, skip=reset)
    assert_fresh(voc, gkg_pyg.create_model("gkgnet_s", num_classes=20, **SMALL), reset)


def test_names_tags_and_paths(hub_dir, tmp_path):
    with pytest.raises(ValueError, match=r"gkgnet_ti has no pretrained tag 'coco_576'; its tags: \['imagenet'\]"):
        gkg_pyg.create_model("gkgnet_ti.coco_576")
    with pytest.raises(FileNotFoundError, match=r"checkpoint not found: imagent .*tag of pvig_ti: \['imagenet'\]"):
        gkg_pyg.create_model("pvig_ti", pretrained="imagent")
    with pytest.raises(TypeError, match="pretrained must be"):
        gkg_pyg.create_model("pvig_ti", pretrained=1)
    with pytest.raises(ValueError, match="did you mean 'pvig_ti'"):
        gkg_pyg.create_model("pvig_tl.imagenet")
    assert get_pretrained_cfg("gkgnet_s")["tag"] == "imagenet"
    assert get_pretrained_cfg("gkgnet_s.coco_576")["url"] is None
    assert get_pretrained_cfg("pvig_s")["mean"] == (127.5, 127.5, 127.5)  # the model's own keys are kept


@pytest.mark.parametrize("variant", ["ti", "s", "m", "b"])
def test_table_of_published_weights(variant):
    pvig, gkg = hub.PRETRAINED[f"pvig_{variant}"], hub.PRETRAINED[f"gkgnet_{variant}"]
    assert list(pvig) == ["imagenet"] and list(gkg)[0] == "imagenet"
    for entry in (pvig["imagenet"], gkg["imagenet"]):
        assert entry["url"] == hub.PVIG_RELEASE + entry["filename"]
        assert entry["filename"].startswith(f"pvig_{variant}_") and entry["filename"].endswith(".pth.tar")
        assert entry["source"] == "pyramid_vig"
    assert (pvig["imagenet"]["loads"], gkg["imagenet"]["loads"]) == ("full", "backbone")
    assert gkg["imagenet"]["url"] == pvig["imagenet"]["url"]
    assert set(hub.PRETRAINED) == set(gkg_pyg.list_models())
    # A tag's resolved cfg describes that tag's weights only (none of another tag's metadata).
    default = get_pretrained_cfg(f"gkgnet_{variant}")
    assert (default["tag"], default["num_classes"], default["input_size"]) == ("imagenet", 0, (3, 448, 448))
    assert "COCO" not in str(default)


def test_coco_tag_describes_the_coco_checkpoint():
    cfg = get_pretrained_cfg("gkgnet_s.coco_576")
    described = (cfg["source"], cfg["loads"], cfg["num_classes"], cfg["input_size"])
    assert described == ("gkgnet_mmcls", "full", 80, (3, 576, 576))
    assert "87.65 mAP" in cfg["description"]


def test_builder_reads_model_pretrained(server, hub_dir, monkeypatch, published, tmp_path, caplog):
    path = serve(server, monkeypatch, published, arch="gkgnet_ti")
    overrides = ["model.name=gkgnet_ti", "model.img_size=33", "model.k=3"]
    for value in ("imagenet", "true"):
        torch.manual_seed(2)
        model = build_model(load_config(None, [*overrides, f"model.pretrained={value}"]), ["a", "b", "c"])
        assert_same(model, published[0], skip=LABEL_PATH)
        assert model.pretrained_cfg["tag"] == "imagenet"
    assert server.hits[path] == 1
    assert "pretrained gkgnet_ti.imagenet" in caplog.text
    caplog.clear()
    torch.manual_seed(2)
    quiet = build_model(load_config(None, [*overrides, "model.pretrained=imagenet"]), ["a", "b", "c"], verbose=False)
    assert caplog.text == "" and torch.equal(quiet.pos_embed, model.pos_embed)
    torch.manual_seed(2)
    build_model(load_config(None, [*overrides, "model.pretrained=imagenet"]), ["a"], load_weights=False)
    assert server.hits[path] == 1

    # A string that is an existing file is a path, even one named like a tag.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "imagenet").write_bytes(published[1])
    server.routes.clear()
    model = build_model(load_config(None, [*overrides, "model.pretrained=imagenet"]), ["a", "b", "c"])
    assert_same(model, published[0], skip=LABEL_PATH)
    assert server.hits[path] == 1

    with pytest.raises(FileNotFoundError, match="model.pretrained: checkpoint not found: data/pvig.pth"):
        build_model(load_config(None, [*overrides, "model.pretrained=data/pvig.pth"]), ["a"])
    with pytest.raises(ConfigError, match="model.pretrained must be"):
        build_model(load_config(None, [*overrides, "model.pretrained=3"]), ["a"])


def test_shipped_configs_use_the_registry_weights():
    for stem in ("coco_224", "coco_448", "coco_576"):
        cfg = load_config(CONFIGS / f"{stem}.yaml")
        assert cfg["model"]["pretrained"] == "imagenet"
        pretrained_cfg, path, load = resolve_pretrained(cfg["model"]["name"], cfg["model"]["pretrained"])
        assert load and path is None
        assert pretrained_cfg["url"].endswith("/pyramid-vig/pvig_s_82.1.pth.tar")
        assert pretrained_cfg["loads"] == "backbone"
    voc = load_config(CONFIGS / "voc2007_576.yaml")
    assert voc["model"]["pretrained"] is None and voc["model"]["init_from"]
    assert load_config(CONFIGS / "demo.yaml")["model"]["pretrained"] is None  # runs offline
