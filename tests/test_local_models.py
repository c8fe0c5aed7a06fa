"""local_replicate as a set of models, and as a server that is safe to leave running: over real
HTTP on 127.0.0.1. Image redirects, admin endpoints, the webhook secret, local/i2v, posed real
models (input schemas, 422s), per-scene faults, the create limit, Cancel-After, output_gone."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import httpx
import jsonschema
import pytest
import replicate
from fixtures_images import png_bytes, serve_images, webhook_receiver
from PIL import Image, ImageChops, ImageDraw, ImageStat
from replicate.exceptions import ReplicateError
from replicate.webhook import WebhookSigningSecret
from test_local_replicate import (
    VALIDATOR,
    _now_rfc3339,
    _openapi_to_jsonschema,
    _seconds_between,
    _wait_for,
    assert_no_address,
    assert_problem,
    check,
    wait_done,
)

from backend.model_schemas import available_models, load_schema
from local_replicate import (
    DataDirError,
    ModelConfigError,
    RunningServer,
    ServerConfig,
    create_app,
)
from local_replicate.engine import busiest_window
from local_replicate.models import I2V_SCHEMA, SLIDESHOW_SCHEMA
from local_replicate.threaded import UvicornThread

OPENAPI = Path("/work/shared/reference/replicate-openapi.json")
SMALL = {"width": 320, "height": 240}
THROTTLED = re.compile(r"^Request was throttled\. Your rate limit resets in ~(\d+)s\.$")

KLING = "kwaivgi/kling-v2.1"
WAN = "wan-video/wan-2.2-i2v-fast"
# Each stored model, its image field, and what its defaults make: seconds, fps
POSED = {
    KLING: ("start_image", 5, 24),
    "minimax/hailuo-02": ("first_frame_image", 6, 24),
    "bytedance/seedance-1-lite": ("image", 5, 24),
    WAN: ("image", 81 / 16, 16),
    "luma/ray-flash-2-720p": ("start_image", 5, 24),
}
# An input schema as cog publishes one: the enums behind allOf $refs into components.
COG_STYLE = "acme/cog-style"
COG_SCHEMA: dict[str, Any] = {
    "type": "object",
    "title": "Input",
    "required": ["start_image"],
    "properties": {
        "start_image": {"type": "string", "format": "uri"},
        "duration": {"allOf": [{"$ref": "#/components/schemas/duration"}], "default": 4},
    },
}
COG_COMPONENTS: dict[str, Any] = {
    "duration": {"enum": [2, 4], "type": "integer", "title": "duration"},
}


def stored(model: str) -> dict[str, Any]:
    """The pipeline's stored schema, as the server serves it (without the pipeline's note)."""
    schema = load_schema(model)
    del schema["x-source"]
    return schema


def textured_png(size: tuple[int, int] = (400, 300)) -> bytes:
    """Lines and a gradient: a zoom or pan over it changes the pixels (a flat colour would not)."""
    image = Image.new("RGB", size)
    draw = ImageDraw.Draw(image)
    width, height = size
    for x in range(width):
        draw.line([(x, 0), (x, height)], fill=(x * 255 // width, 80, 255 - x * 255 // width))
    for i in range(0, width, 25):
        draw.line([(i, 0), (width - i, height)], fill=(250, 250, 60), width=3)
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def textured_data_url() -> str:
    return "data:image/png;base64," + base64.b64encode(textured_png()).decode()


# -- a loopback image server that can redirect --


@dataclass
class ImageServer:
    base_url: str = ""
    port: int = 0
    hits: list[str] = field(default_factory=list)
    redirects: dict[str, str] = field(default_factory=dict)  # path -> Location


@contextmanager
def image_server() -> Iterator[ImageServer]:
    server = ImageServer()
    files = {"/img.png": png_bytes((64, 48), (200, 40, 40)), "/texture.png": textured_png()}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            server.hits.append(self.path)
            if self.path in server.redirects:
                self.send_response(302)
                self.send_header("Location", server.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = files.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.port = httpd.server_address[1]
    server.base_url = f"http://127.0.0.1:{server.port}"
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        httpd.shutdown()
        httpd.server_close()


# -- fixtures and helpers --


@pytest.fixture(scope="module")
def lr(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    config = ServerConfig(
        data_dir=tmp_path_factory.mktemp("lr-models"),
        start_delay=0.05,
        # posed models ask for 720p or more; tests need the length and the motion, not the pixels
        clip_max_height=240,
    )
    with RunningServer(config) as server:
        yield server


@pytest.fixture
def api(lr: RunningServer) -> Iterator[httpx.Client]:
    lr.reset()
    with httpx.Client(base_url=lr.base_url, headers={"Authorization": "Bearer t"}, timeout=60) as c:
        yield c


def create_model(
    api: httpx.Client, model: str, inp: dict[str, Any], cancel_after: str | None = None
) -> httpx.Response:
    headers = {"Cancel-After": cancel_after} if cancel_after is not None else {}
    return api.post(f"/v1/models/{model}/predictions", json={"input": inp}, headers=headers)


def quick_clip(**inp: Any) -> dict[str, Any]:
    """local/i2v input for a one-second, four-frame clip."""
    return {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL, **inp}


def created(resp: httpx.Response) -> dict[str, Any]:
    assert resp.status_code == 201, resp.text
    return check(resp.json(), str(resp.url.copy_with(path="/", query=None)).rstrip("/"))


def invalid_fields(resp: httpx.Response) -> list[dict[str, str]]:
    body = assert_problem(resp, 422)
    assert body["title"] == "Input validation failed"
    for f in body["invalid_fields"]:
        assert f"- {f['field']}: {f['description']}\n" in body["detail"]
    fields: list[dict[str, str]] = body["invalid_fields"]
    return fields


@dataclass
class Video:
    codec: str
    pix_fmt: str
    width: int
    height: int
    seconds: float
    frames: list[Image.Image]


def fetch_video(url: str, path: Path) -> Video:
    resp = httpx.get(url, timeout=60)
    assert resp.status_code == 200 and resp.content[4:8] == b"ftyp"
    path.write_bytes(resp.content)
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_image() for f in container.decode(stream)]
        return Video(
            stream.codec_context.name,
            stream.codec_context.pix_fmt,
            stream.width,
            stream.height,
            container.duration / 1e6,
            frames,
        )


def difference(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute difference of two frames, 0..255."""
    return sum(ImageStat.Stat(ImageChops.difference(a, b)).mean) / 3


# -- images: no cross-host redirects, short errors --


def test_image_redirects_stay_on_their_host(api: httpx.Client, lr: RunningServer) -> None:
    with image_server() as first, image_server() as other:
        first.redirects = {
            "/same": "/img.png",
            "/twice": "/same",
            "/away": f"{other.base_url}/img.png",
            # the same server under another name is another host too
            "/renamed": f"http://localhost:{first.port}/img.png",
            "/loop": "/loop",
        }

        def run(url: str, field: str = "images") -> dict[str, Any]:
            if field == "images":
                resp = api.post(
                    "/v1/predictions",
                    json={"version": "v", "input": {"images": [url], "durations": [0.2], **SMALL}},
                )
            else:
                resp = create_model(api, "local/i2v", {"image": url, "duration": 1, **SMALL})
            return wait_done(api, created(resp)["id"])[0]

        for path in ("/same", "/twice"):
            assert run(f"{first.base_url}{path}")["status"] == "succeeded"

        refused = "could not fetch the image (redirect to another host refused)"
        away = run(f"{first.base_url}/away")
        assert away["status"] == "failed" and away["error"] == f"images[0]: {refused}"
        assert other.hits == []  # never contacted
        renamed = run(f"{first.base_url}/renamed", field="image")
        assert renamed["error"] == f"image: {refused}"
        looped = run(f"{first.base_url}/loop")
        assert looped["error"] == "images[0]: could not fetch the image (too many redirects)"
        # a few same-origin hops at most: the first request and three redirects
        assert first.hits.count("/loop") == 4
        for done in (away, renamed, looped):
            assert_no_address(done["error"])
            assert str(first.port) not in done["error"] and str(other.port) not in done["error"]
            assert str(first.port) not in done["logs"] and str(other.port) not in done["logs"]


def test_fetch_errors_name_no_address_port_or_exception(api: httpx.Client) -> None:
    with image_server() as images:
        closed = images.port
    cases = {
        f"http://127.0.0.1:{closed}/img.png": "connection failed",
        "http://[::1:bad/img.png": "invalid URL",
        "data:image/png;base64": "malformed data: URL",
    }
    with image_server() as images:
        cases[f"{images.base_url}/nope.png"] = "HTTP 404"
        for url, reason in cases.items():
            resp = create_model(api, "local/i2v", {"image": url, "duration": 1, **SMALL})
            done, _ = wait_done(api, created(resp)["id"])
            assert done["error"] == f"image: could not fetch the image ({reason})", done
            assert_no_address(done["error"])


# -- admin endpoints only when asked for --


def test_admin_endpoints_are_404_unless_enabled(tmp_path: Path) -> None:
    calls = [
        ("GET", "/_admin/stats"),
        ("GET", "/_admin/health"),
        ("GET", "/_admin/faults"),
        ("POST", "/_admin/faults"),
        ("DELETE", "/_admin/faults"),
        ("POST", "/_admin/reset"),
    ]
    assert ServerConfig(data_dir=tmp_path).admin is False
    with UvicornThread(create_app(ServerConfig(data_dir=tmp_path / "a"))) as plain:
        for method, path in calls:
            resp = httpx.request(method, f"{plain.base_url}{path}", json={"kind": "fail"})
            assert_problem(resp, 404)
    with RunningServer(ServerConfig(data_dir=tmp_path / "b"), admin=False) as off:
        assert_problem(httpx.get(f"{off.base_url}/_admin/stats"), 404)
    with RunningServer(ServerConfig(data_dir=tmp_path / "c")) as on:
        assert httpx.get(f"{on.base_url}/_admin/health").json() == {"ok": True}
        assert on.stats()["creates"] == 0

    # the command line: off by default (the dev stack), on with --admin
    for flags, status in (([], 404), (["--admin"], 200)):
        proc = subprocess.Popen(
            [sys.executable, "-m", "local_replicate", "--port", "0", "--data-dir", str(tmp_path)]
            + flags,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert proc.stdout is not None
            base = proc.stdout.readline().strip().rpartition(" ")[2]
            assert httpx.get(f"{base}/_admin/health").status_code == status
        finally:
            proc.terminate()
            assert proc.wait(timeout=20) == 0


# -- the webhook secret --


def test_webhook_secret_is_random_per_data_dir_and_kept(tmp_path: Path) -> None:
    def served(server: RunningServer) -> str:
        resp = httpx.get(
            f"{server.base_url}/v1/webhooks/default/secret", headers={"Authorization": "Bearer t"}
        )
        assert resp.status_code == 200
        key: str = resp.json()["key"]
        return key

    one, two = tmp_path / "one", tmp_path / "two"
    with RunningServer(ServerConfig(data_dir=one)) as server:
        first = served(server)
        assert first == server.webhook_secret and first.startswith("whsec_")
        assert len(base64.b64decode(first.removeprefix("whsec_"))) == 32
        assert_problem(httpx.get(f"{server.base_url}/v1/webhooks/default/secret"), 401)
    kept = one / "webhook-secret"
    assert kept.read_text().strip() == first
    assert stat.S_IMODE(os.stat(kept).st_mode) == 0o600
    with RunningServer(ServerConfig(data_dir=one)) as again:
        assert served(again) == first  # across a restart
    with RunningServer(ServerConfig(data_dir=two)) as other:
        assert served(other) != first
    configured = "whsec_" + base64.b64encode(b"configured-secret-for-this-test").decode()
    with RunningServer(ServerConfig(data_dir=one, webhook_secret=configured)) as override:
        assert served(override) == configured == override.webhook_secret
    assert kept.read_text().strip() == first  # an override does not replace the kept one

    kept.write_text("not a secret")
    with pytest.raises(DataDirError, match="whsec_"):
        create_app(ServerConfig(data_dir=one))


def test_webhooks_are_signed_with_the_data_dirs_secret(tmp_path: Path) -> None:
    with (
        RunningServer(ServerConfig(data_dir=tmp_path, start_delay=0.05)) as server,
        webhook_receiver() as hooks,
        httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer t"}) as api,
    ):
        inp = {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL}
        resp = api.post(
            "/v1/models/local/i2v/predictions",
            json={
                "input": inp,
                "webhook": f"{hooks.base_url}/h",
                "webhook_events_filter": ["start"],
            },
        )
        created(resp)
        _wait_for(lambda: len(hooks.to("/h")) == 1)
        (call,) = hooks.to("/h")
    secret = (tmp_path / "webhook-secret").read_text().strip()
    assert replicate.webhooks.validate(
        headers=call.headers, body=call.body, secret=WebhookSigningSecret(key=secret), tolerance=300
    ) in (None, True)


# -- local/i2v --


def test_i2v_makes_a_clip_of_the_requested_seconds_with_motion(
    api: httpx.Client, tmp_path: Path
) -> None:
    with image_server() as images:
        inp = {
            "image": f"{images.base_url}/texture.png",
            "prompt": "a slow push in",
            "duration": 2,
            "fps": 12,
            **SMALL,
        }
        pred = created(create_model(api, "local/i2v", inp))
        assert (pred["model"], pred["version"]) == ("local/i2v", "hidden")
        done, _ = wait_done(api, pred["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["video_output_duration_seconds"] == 2
    assert done["metrics"]["predict_time"] > 0
    video = fetch_video(done["output"], tmp_path / "clip.mp4")
    assert (video.codec, video.pix_fmt, video.width, video.height) == ("h264", "yuv420p", 320, 240)
    assert abs(video.seconds - 2.0) < 0.05 and len(video.frames) == 24
    # consecutive frames differ, and the motion goes somewhere: the last frame is further from
    # the first than any frame from the one before it
    steps = [difference(a, b) for a, b in zip(video.frames, video.frames[1:], strict=False)]
    assert min(steps) > 0.5, steps
    assert difference(video.frames[0], video.frames[-1]) > max(steps)

    # the defaults: 5 s at 24 fps, 1280x720 (which this server scales down to 240 lines)
    default = created(create_model(api, "local/i2v", {"image": textured_data_url()}))
    done, _ = wait_done(api, default["id"])
    assert done["status"] == "succeeded", done["error"]
    video = fetch_video(done["output"], tmp_path / "default.mp4")
    assert (video.width, video.height, len(video.frames)) == (426, 240, 120)
    assert abs(video.seconds - 5.0) < 0.05


@pytest.mark.parametrize(
    ("inp", "field", "kind"),
    [
        ({"duration": 11}, "input.duration", "number_lte"),
        ({"duration": 0}, "input.duration", "number_gte"),
        ({"duration": 2.5}, "input.duration", "invalid_type"),
        ({"duration": "5"}, "input.duration", "invalid_type"),
        ({"width": 321}, "input.width", "multiple_of"),
        ({"image": None}, "input.image", "invalid_type"),
        ({"image": "ftp://example.com/a.png"}, "input.image", "format"),
        ({"images": ["x"]}, "input", "additional_property_not_allowed"),
    ],
)
def test_i2v_input_is_checked_at_create(
    api: httpx.Client, lr: RunningServer, inp: dict[str, Any], field: str, kind: str
) -> None:
    resp = create_model(api, "local/i2v", {"image": textured_data_url(), **inp})
    (problem,) = invalid_fields(resp)
    assert (problem["field"], problem["type"]) == (field, kind)
    assert lr.stats()["predictions"] == {}  # nothing was created


def test_i2v_lists_every_problem(api: httpx.Client) -> None:
    fields = invalid_fields(create_model(api, "local/i2v", {"duration": 99, "colour": "red"}))
    assert {(f["field"], f["description"]) for f in fields} == {
        ("input", "image is required"),
        ("input", "Additional property colour is not allowed"),
        ("input.duration", "Must be less than or equal to 10"),
    }


# -- GET /v1/models/{owner}/{name} --


def _model_validators() -> tuple[Any, Any]:
    spec = json.loads(OPENAPI.read_text())
    schemas = spec["components"]["schemas"]
    model = jsonschema.Draft7Validator(_openapi_to_jsonschema(schemas["schemas_model_response"]))
    version = jsonschema.Draft7Validator(
        _openapi_to_jsonschema(schemas["schemas_version_response"])
    )
    return model, version


def test_model_endpoint_serves_each_models_schema(api: httpx.Client, lr: RunningServer) -> None:
    model_validator, version_validator = _model_validators()
    expected: dict[str, Any] = {"local/i2v": I2V_SCHEMA, "local/slideshow": SLIDESHOW_SCHEMA}
    expected |= {model: stored(model) for model in POSED}
    versions = set()
    for name, schema in expected.items():
        resp = api.get(f"/v1/models/{name}")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        model_validator.validate(body)
        version_validator.validate(body["latest_version"])
        assert (body["owner"], body["name"], body["visibility"]) == (*name.split("/"), "public")
        assert body["description"]
        openapi = body["latest_version"]["openapi_schema"]
        assert openapi["openapi"] == "3.0.2"
        schemas = openapi["components"]["schemas"]
        assert schemas["Output"] == {"type": "string", "format": "uri", "title": "Output"}
        assert schemas["Input"] == schema
        versions.add(body["latest_version"]["id"])
    assert len(versions) == 7 and all(re.fullmatch(r"[0-9a-f]{64}", v) for v in versions)
    # the old name of the slideshow answers too
    old = api.get("/v1/models/local-replicate/slideshow").json()
    assert old["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"] == (
        SLIDESHOW_SCHEMA
    )

    assert_problem(api.get("/v1/models/acme/nothing"), 404)
    assert_problem(httpx.get(f"{lr.base_url}/v1/models/local/i2v"), 401)

    # the official client reads it, and a create by that version id runs that model
    client = replicate.Client(api_token="t", base_url=lr.base_url)
    model = client.models.get("local/i2v")
    assert model.latest_version is not None
    assert model.latest_version.openapi_schema["components"]["schemas"]["Input"] == I2V_SCHEMA
    by_version = client.predictions.create(
        version=model.latest_version.id,
        input={"image": textured_data_url(), "duration": 1, **SMALL},
    )
    assert by_version.model == "local/i2v"
    with pytest.raises(ReplicateError) as info:
        client.predictions.create(version=model.latest_version.id, input={"duration": 1})
    assert info.value.status == 422
    assert wait_done(api, by_version.id)[0]["metrics"]["video_output_duration_seconds"] == 1


# -- posed models --


def test_posing_as_kling(api: httpx.Client, lr: RunningServer, tmp_path: Path) -> None:
    inp = {"prompt": "a lighthouse at dusk", "start_image": textured_data_url(), "duration": 5}
    pred = created(create_model(api, KLING, inp))
    assert (pred["model"], pred["version"], pred["input"]) == (KLING, "hidden", inp)
    done, _ = wait_done(api, pred["id"])
    assert done["status"] == "succeeded", done["error"]
    VALIDATOR.validate(done)
    assert done["metrics"]["video_output_duration_seconds"] == 5
    video = fetch_video(done["output"], tmp_path / "kling.mp4")
    # Kling standard is 720p at 24 fps; this server scales clips down to 240 lines
    assert abs(video.seconds - 5.0) < 0.05 and len(video.frames) == 120
    assert (video.codec, video.width, video.height) == ("h264", 426, 240)
    assert difference(video.frames[0], video.frames[1]) > 0.5

    def without(key: str) -> dict[str, Any]:
        return {k: v for k, v in inp.items() if k != key}

    cases = [
        (
            {**inp, "duration": 7},
            ("enum", "input.duration", "duration must be one of the following: 5, 10"),
        ),
        (
            {**inp, "mode": "turbo"},
            ("enum", "input.mode", 'mode must be one of the following: "standard", "pro"'),
        ),
        (without("start_image"), ("required", "input", "start_image is required")),
        (without("prompt"), ("required", "input", "prompt is required")),
        (
            {**inp, "image": inp["start_image"]},
            (
                "additional_property_not_allowed",
                "input",
                "Additional property image is not allowed",
            ),
        ),
        (
            {**inp, "start_image": 5},
            ("invalid_type", "input.start_image", "Invalid type. Expected: string, given: integer"),
        ),
    ]
    for bad, (kind, field_name, description) in cases:
        (problem,) = invalid_fields(create_model(api, KLING, bad))
        assert problem == {"type": kind, "field": field_name, "description": description}
    assert list(lr.stats()["predictions"]) == [pred["id"]]

    # the default duration comes from the schema
    default = {k: v for k, v in inp.items() if k != "duration"}
    done, _ = wait_done(api, created(create_model(api, KLING, default))["id"])
    assert done["metrics"]["video_output_duration_seconds"] == 5


def test_posing_as_a_model_that_counts_frames(api: httpx.Client, tmp_path: Path) -> None:
    inp = {"image": textured_data_url(), "prompt": "waves"}
    inp |= {"num_frames": 81, "frames_per_second": 27}
    done, _ = wait_done(api, created(create_model(api, WAN, inp))["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["video_output_duration_seconds"] == 3  # 81 frames at 27 fps
    video = fetch_video(done["output"], tmp_path / "wan.mp4")
    assert len(video.frames) == 81 and abs(video.seconds - 3.0) < 0.05
    assert (video.width, video.height) == (426, 240)  # 480p, scaled to the server's 240
    (problem,) = invalid_fields(create_model(api, WAN, {**inp, "num_frames": 80}))
    assert problem == {
        "type": "number_gte",
        "field": "input.num_frames",
        "description": "Must be greater than or equal to 81",
    }


@pytest.mark.parametrize("model", sorted(POSED))
def test_posing_as_each_stored_model(
    api: httpx.Client, lr: RunningServer, tmp_path: Path, model: str
) -> None:
    """Each stored model, with only its image and a prompt: a clip as long as its schema's
    default duration, at its frame rate, with motion."""
    image_field, seconds, fps = POSED[model]
    inp = {image_field: textured_data_url(), "prompt": "the tide comes in"}
    pred = created(create_model(api, model, inp))
    assert (pred["model"], pred["version"]) == (model, "hidden")
    done, _ = wait_done(api, pred["id"])
    assert done["status"] == "succeeded", done["error"]
    assert done["metrics"]["video_output_duration_seconds"] == pytest.approx(seconds)
    video = fetch_video(done["output"], tmp_path / "posed.mp4")
    assert len(video.frames) == round(seconds * fps) and abs(video.seconds - seconds) < 0.05
    assert video.height == 240 and video.codec == "h264" and video.pix_fmt == "yuv420p"
    assert difference(video.frames[0], video.frames[1]) > 0.5
    (problem,) = invalid_fields(create_model(api, model, {**inp, "colour": "red"}))
    assert problem["description"] == "Additional property colour is not allowed"


def test_every_stored_schema_is_posed_by_default(api: httpx.Client, lr: RunningServer) -> None:
    stored_models = [m for m in available_models() if not m.startswith("local/")]
    assert sorted(stored_models) == sorted(POSED)
    for model in available_models():
        body = api.get(f"/v1/models/{model}").json()
        served = body["latest_version"]["openapi_schema"]["components"]["schemas"]["Input"]
        # the local ones are this server's own: the pipeline's stored copies must match them
        assert served == stored(model), model


def test_a_model_that_also_takes_text_alone(api: httpx.Client, tmp_path: Path) -> None:
    # Seedance's image is optional (text to video): the clip moves over a generated picture
    inp = {"prompt": "a red kite over dunes", "duration": 2}
    done, _ = wait_done(api, created(create_model(api, "bytedance/seedance-1-lite", inp))["id"])
    assert done["status"] == "succeeded", done["error"]
    video = fetch_video(done["output"], tmp_path / "text.mp4")
    assert len(video.frames) == 48 and difference(video.frames[0], video.frames[-1]) > 1
    assert "no image given" in done["logs"]
    (problem,) = invalid_fields(create_model(api, "bytedance/seedance-1-lite", {"duration": 2}))
    assert problem == {"type": "required", "field": "input", "description": "prompt is required"}


def test_a_cog_style_schema_with_refs(tmp_path: Path) -> None:
    schemas = tmp_path / "schemas"
    schemas.mkdir()
    stored_file = {**COG_SCHEMA, "components": {"schemas": COG_COMPONENTS}}
    (schemas / "acme__cog-style.json").write_text(json.dumps(stored_file))
    config = ServerConfig(data_dir=tmp_path / "data", schemas_dir=schemas, start_delay=0.05)
    with (
        RunningServer(config) as server,
        httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer t"}) as api,
    ):
        body = api.get(f"/v1/models/{COG_STYLE}").json()
        schemas_served = body["latest_version"]["openapi_schema"]["components"]["schemas"]
        assert schemas_served["Input"] == COG_SCHEMA
        assert schemas_served["duration"] == COG_COMPONENTS["duration"]
        (problem,) = invalid_fields(
            create_model(api, COG_STYLE, {"start_image": textured_data_url(), "duration": 3})
        )
        assert problem["description"] == "duration must be one of the following: 2, 4"
        inp = {"start_image": textured_data_url(), "duration": 2}
        done, _ = wait_done(api, created(create_model(api, COG_STYLE, inp))["id"])
        assert done["metrics"]["video_output_duration_seconds"] == 2
        assert server.stats()["predictions"] == {done["id"]: "succeeded"}
        # only the models in this folder are posed, besides the built-in ones
        assert_problem(api.get(f"/v1/models/{KLING}"), 404)


def test_which_models_are_posed_is_configurable(tmp_path: Path) -> None:
    headers = {"Authorization": "Bearer t"}
    config = ServerConfig(data_dir=tmp_path, pose=(WAN,))
    with RunningServer(config) as server:
        assert httpx.get(f"{server.base_url}/v1/models/{WAN}", headers=headers).status_code == 200
        assert_problem(httpx.get(f"{server.base_url}/v1/models/{KLING}", headers=headers), 404)
        resp = httpx.post(
            f"{server.base_url}/v1/models/{KLING}/predictions", json={"input": {}}, headers=headers
        )
        assert_problem(resp, 404)
    with pytest.raises(ModelConfigError, match="acme/missing"):
        create_app(ServerConfig(data_dir=tmp_path, pose=("acme/missing",)))
    proc = subprocess.run(
        [sys.executable, "-m", "local_replicate", "--port", "0", "--data-dir", str(tmp_path)]
        + ["--pose", f"{WAN},acme/missing"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "cannot pose as acme/missing" in proc.stderr
    assert "Traceback" not in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "acme__noimage.json").write_text(json.dumps({"properties": {"prompt": {}}}))
    with pytest.raises(ModelConfigError, match="no image field"):
        create_app(ServerConfig(data_dir=tmp_path, schemas_dir=broken))


# -- faults for one scene --


def test_fault_match_fails_one_scene_only(api: httpx.Client, lr: RunningServer) -> None:
    lr.add_fault("fail", times=None, detail="scene 3 exploded", match={"prompt": "scene 3"})
    image = textured_data_url()
    preds = {
        n: created(create_model(api, "local/i2v", quick_clip(image=image, prompt=f"scene {n}")))[
            "id"
        ]
        for n in (1, 2, 3, 4)
    }
    results = {n: wait_done(api, pid)[0] for n, pid in preds.items()}
    assert {n: r["status"] for n, r in results.items()} == {
        1: "succeeded",
        2: "succeeded",
        3: "failed",
        4: "succeeded",
    }
    assert results[3]["error"] == "scene 3 exploded"
    # a fault that matched nothing else stays queued, with its uses untouched
    (queued,) = lr.stats()["faults"]
    assert queued["match"] == {"prompt": "scene 3"} and queued["times"] is None
    lr.clear_faults()

    # a substring of an image URL, in a slideshow's list or a posed model's image field
    with serve_images(Path(lr.config.data_dir) / "scenes") as urls:
        lr.add_fault("abort", match={"images": "/img2.png"})
        lr.add_fault("server_error", match={"start_image": "img3"})
        plain = api.post("/v1/predictions", json={"version": "v", "input": {"images": urls[:2]}})
        hit = api.post("/v1/predictions", json={"version": "v", "input": {"images": urls[1:3]}})
        assert wait_done(api, created(plain)["id"])[0]["status"] == "succeeded"
        assert wait_done(api, created(hit)["id"])[0]["status"] == "aborted"
        kling = {"prompt": "p", "start_image": urls[3], "duration": 5}
        assert_problem(create_model(api, KLING, kling), 500)
    assert lr.stats()["faults"] == []

    bad = httpx.post(
        f"{lr.base_url}/_admin/faults", json={"kind": "download_error", "match": {"x": "y"}}
    )
    assert "match" in assert_problem(bad, 422)["detail"]
    assert_problem(
        httpx.post(f"{lr.base_url}/_admin/faults", json={"kind": "fail", "match": []}), 422
    )


# -- the create limit --


def test_create_limit_answers_429_like_replicate(tmp_path: Path) -> None:
    config = ServerConfig(data_dir=tmp_path, create_limit_per_minute=3)
    with (
        RunningServer(config) as server,
        httpx.Client(base_url=server.base_url, headers={"Authorization": "Bearer t"}) as api,
    ):
        server.add_fault("slow_start", times=None, delay=60)  # nothing needs to render
        inp = {"image": textured_data_url(), "duration": 1, **SMALL}
        for _ in range(3):
            created(create_model(api, "local/i2v", inp))
        throttled = create_model(api, "local/i2v", inp)
        body = assert_problem(throttled, 429)
        seconds = THROTTLED.match(body["detail"])
        assert seconds, body["detail"]
        assert throttled.headers["retry-after"] == seconds.group(1)
        assert 1 <= int(seconds.group(1)) <= 60

        client = replicate.Client(api_token="t", base_url=server.base_url)
        with pytest.raises(ReplicateError) as info:
            client.predictions.create(model="local/i2v", input=inp)
        assert info.value.status == 429
        stats = server.stats()
        assert len(stats["predictions"]) == 3 and stats["throttled"] == 2
        assert stats["max_creates_per_minute"] == 3 and stats["create_limit_per_minute"] == 3


def test_busiest_minute() -> None:
    assert busiest_window([], 60) == 0
    assert busiest_window([0, 10, 59.9, 60, 61, 200], 60) == 4  # 10, 59.9, 60, 61
    assert busiest_window([0, 60, 120], 60) == 1


# -- Cancel-After --


def test_cancel_after_aborts_a_starting_and_cancels_a_processing_prediction(
    api: httpx.Client, lr: RunningServer
) -> None:
    inp = {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL}
    slow_start = {"_fault": {"kind": "slow_start", "delay": 60}}
    slow_render = {"_fault": {"kind": "slow_render", "delay": 60}}
    waiting = created(create_model(api, "local/i2v", {**inp, **slow_start}, cancel_after="5s"))
    running = created(create_model(api, "local/i2v", {**inp, **slow_render}, cancel_after="5"))
    _wait_for(lambda: api.get(f"/v1/predictions/{running['id']}").json()["status"] == "processing")
    aborted, _ = wait_done(api, waiting["id"])
    canceled, seen = wait_done(api, running["id"])

    assert aborted["status"] == "aborted" and "started_at" not in aborted
    assert "predict_time" not in aborted["metrics"]  # not billed
    assert _seconds_between(aborted["created_at"], aborted["completed_at"]) >= 5
    assert canceled["status"] == "canceled" and seen[-1] == "canceled"
    assert _seconds_between(canceled["created_at"], canceled["completed_at"]) >= 5
    assert canceled["metrics"]["predict_time"] > 0  # billed for the time it ran
    assert canceled["output"] is None
    assert "Cancel-After" in aborted["logs"] and "Cancel-After" in canceled["logs"]
    assert lr.stats()["cancels"] == 0  # the server ended them itself


def test_cancel_after_header_is_checked(api: httpx.Client) -> None:
    inp = {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL}
    for bad in ("soon", "4s", "0", "-10s", "10x", "5m10", "1.2.3s", ""):
        resp = create_model(api, "local/i2v", inp, cancel_after=bad)
        assert "Cancel-After" in assert_problem(resp, 422)["detail"], bad
    for good in ("1h30m", "90s", "10m", "2h", "7.5s"):
        done, _ = wait_done(
            api, created(create_model(api, "local/i2v", inp, cancel_after=good))["id"]
        )
        assert done["status"] == "succeeded"  # a deadline it beats changes nothing
    by_version = api.post(
        "/v1/predictions",
        json={"version": "v", "input": {"images": [textured_data_url()]}},
        headers={"Cancel-After": "nope"},
    )
    assert_problem(by_version, 422)


# -- output_gone --


def test_output_gone_fault(api: httpx.Client, lr: RunningServer) -> None:
    inp = {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL}
    lr.add_fault("output_gone", match={"prompt": "lost"})
    gone, _ = wait_done(
        api, created(create_model(api, "local/i2v", {**inp, "prompt": "lost"}))["id"]
    )
    kept, _ = wait_done(api, created(create_model(api, "local/i2v", inp))["id"])
    assert gone["status"] == "succeeded" and gone["output"] and gone["data_removed"] is False
    body = assert_problem(httpx.get(gone["output"]), 410)
    assert body["title"] == "Gone"
    assert httpx.head(gone["output"]).status_code == 410
    assert httpx.get(gone["output"], headers={"Range": "bytes=0-7"}).status_code == 410
    assert httpx.get(kept["output"]).status_code == 200
    assert lr.stats()["faults"] == []


def test_output_gone_after_a_delay(api: httpx.Client, lr: RunningServer) -> None:
    lr.add_fault("output_gone", delay=2.0)
    inp = {"image": textured_data_url(), "duration": 1, "fps": 4, **SMALL}
    done, _ = wait_done(api, created(create_model(api, "local/i2v", inp))["id"])
    _wait_for(lambda: httpx.get(done["output"]).status_code == 410)
    # not before its delay
    assert _seconds_between(done["completed_at"], _now_rfc3339()) >= 2.0
