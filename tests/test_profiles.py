"""Model profiles: durations a model accepts, the inputs built for it, its schema, its cost."""

from __future__ import annotations

import json
from decimal import Decimal
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from activities.predictions import PredictionActivities
from backend.model_schemas import UnknownSchema, available_models, load_schema
from backend.profiles import (
    BUILTIN_PROFILES,
    InputRejected,
    ModelProfile,
    ProfileError,
    SceneTooLong,
    UnknownModel,
    billed_cost,
    billed_seconds,
    duration_value,
    estimate_cost,
    input_digest,
    max_scene_seconds,
    profile_for,
    scene_input,
    storyboard_billed_seconds,
    storyboard_input,
    validate_input,
)
from backend.settings import Settings
from backend.storyboard import Storyboard

IMAGE = "https://img.example/scene.png"
PER_SCENE = [profile for profile in BUILTIN_PROFILES if profile.per_scene]


def settings(**values: object) -> Settings:
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def profile(model: str, **values: object) -> ModelProfile:
    return profile_for(settings(replicate_model=model, **values))


def test_every_builtin_profile_has_a_valid_stored_schema() -> None:
    assert available_models() == sorted(p.name for p in BUILTIN_PROFILES)
    for item in BUILTIN_PROFILES:
        schema = load_schema(item.model)
        Draft202012Validator.check_schema(schema)
        assert schema["type"] == "object"
        assert {"url", "read"} <= set(schema["x-source"])
        # Every field the profile fills is a field the model has.
        fields = {item.image_field, item.duration.field, *item.fixed_input}
        fields |= {f for f in (item.prompt_field, item.last_frame_field) if f}
        assert fields <= set(schema["properties"]), item.name


def test_load_schema_ignores_the_version_and_refuses_unknown_models() -> None:
    assert load_schema("kwaivgi/kling-v2.1:abc") == load_schema("kwaivgi/kling-v2.1")
    with pytest.raises(UnknownSchema, match="No stored input schema for acme/nothing"):
        load_schema("acme/nothing")
    # A caller changing its copy does not change what the next caller gets.
    load_schema("local/i2v")["properties"].clear()
    assert "image" in load_schema("local/i2v")["properties"]


@pytest.mark.parametrize("item", PER_SCENE, ids=lambda p: p.name)
@pytest.mark.parametrize("seconds", [0.5, 2, 5, 6.5, None])
def test_scene_input_validates_against_the_models_schema(
    item: ModelProfile, seconds: float | None
) -> None:
    scene_seconds = max_scene_seconds(item) if seconds is None else seconds
    for prompt in ("a slow pan across the bay", None):
        model_input = scene_input(item, image_url=IMAGE, prompt=prompt, scene_seconds=scene_seconds)
        validate_input(item, model_input)
        assert model_input[item.image_field] == IMAGE
        assert model_input[item.duration.field] == duration_value(item, scene_seconds)
        assert billed_seconds(item, scene_seconds) >= Decimal(str(scene_seconds))


def test_slideshow_storyboard_input_validates_and_joins_prompts() -> None:
    slideshow = profile("local/slideshow")
    board = Storyboard.parse(
        [
            {"image_url": "https://a/1.png", "prompt": "dawn", "duration_seconds": 0.5},
            {"image_url": "https://a/2.png", "duration_seconds": 2},
            {"image_url": "https://a/3.png", "prompt": "dusk", "duration_seconds": 6.5},
        ]
    )
    model_input = storyboard_input(slideshow, board.scenes, extra={"fps": 12})
    validate_input(slideshow, model_input)
    assert model_input == {
        "fps": 12,
        "images": ["https://a/1.png", "https://a/2.png", "https://a/3.png"],
        "durations": [0.5, 2.0, 6.5],
        "prompt": "dawn / dusk",
    }
    assert slideshow.still_image and not slideshow.per_scene
    with pytest.raises(ProfileError, match="use scene_input"):
        storyboard_input(profile("local/i2v"), board.scenes)
    with pytest.raises(ProfileError, match="use storyboard_input"):
        scene_input(slideshow, image_url=IMAGE, prompt=None, scene_seconds=2)


def test_slideshow_input_and_its_digest_match_the_ledgers() -> None:
    # The ledger matches predictions found at the provider by this digest: the activities'
    # and the profiles' must agree, for every input a profile builds.
    ledger = PredictionActivities(None, None, settings(replicate_model="local/slideshow"))  # type: ignore[arg-type]
    board = Storyboard.parse(
        [
            {"image_url": "https://a/1.png", "prompt": "one", "duration_seconds": 1.5},
            {"image_url": "https://a/2.png", "prompt": "two"},
        ]
    )
    slideshow = profile("local/slideshow")
    built = storyboard_input(slideshow, board.scenes)
    assert built == {
        "images": ["https://a/1.png", "https://a/2.png"],
        "durations": [1.5, 2.0],
        "prompt": "one / two",
    }
    assert input_digest(slideshow, built) == ledger.digest(built)


def test_digest_is_canonical_and_ignores_the_version() -> None:
    kling = profile("kwaivgi/kling-v2.1")
    pinned = profile("kwaivgi/kling-v2.1:daad218f")
    assert pinned.model == "kwaivgi/kling-v2.1:daad218f"
    one = {"start_image": IMAGE, "prompt": "p", "duration": 5}
    assert input_digest(kling, one) == input_digest(pinned, dict(reversed(one.items())))
    assert input_digest(kling, one) != input_digest(kling, {**one, "duration": 10})
    assert input_digest(kling, one) != input_digest(profile("local/i2v"), one)


@pytest.mark.parametrize(
    ("model", "scene", "billed"),
    [
        ("kwaivgi/kling-v2.1", 2, "5"),
        ("kwaivgi/kling-v2.1", 5, "5"),
        ("kwaivgi/kling-v2.1", 7, "10"),
        ("minimax/hailuo-02", 2, "6"),
        ("minimax/hailuo-02", 6.01, "10"),
        ("luma/ray-flash-2-720p", 5.5, "9"),
        ("bytedance/seedance-1-lite", 0.5, "2"),
        ("bytedance/seedance-1-lite", 3.2, "4"),
        ("local/i2v", 0.2, "1"),
        ("local/i2v", 2.5, "3"),
        ("local/slideshow", 2.5, "2.5"),
    ],
)
def test_billed_seconds_is_the_shortest_allowed_length_covering_the_scene(
    model: str, scene: float, billed: str
) -> None:
    assert billed_seconds(profile(model), scene) == Decimal(billed)


def test_frame_count_models_round_up_to_whole_frames() -> None:
    wan = profile("wan-video/wan-2.2-i2v-fast")
    # 16 fps: 2 s is 32 frames, below the model's 81, so 81 frames = 5.0625 s are billed.
    assert duration_value(wan, 2) == 81
    assert billed_seconds(wan, 2) == Decimal("5.0625")
    # 6.01 s is 96.16 frames: 97 frames.
    assert duration_value(wan, 6.01) == 97
    assert billed_seconds(wan, 6.01) == Decimal("6.0625")
    assert max_scene_seconds(wan) == Decimal("7.5625")
    assert (
        scene_input(wan, image_url=IMAGE, prompt="p", scene_seconds=6.01)["frames_per_second"] == 16
    )
    with pytest.raises(SceneTooLong, match="7.6 s, longer than the 7.5625 s"):
        billed_seconds(wan, 7.6)


def test_frame_step_keeps_counts_on_the_models_grid() -> None:
    # A model that takes 4n+1 frames from 29 to 289 at 24 fps.
    grid = ModelProfile.model_validate(
        {
            "model": "acme/grid",
            "image_field": "image",
            "duration": {"kind": "frames", "fps": 24, "min": 29, "max": 289, "frame_step": 4},
        }
    )
    assert duration_value(grid, 2) == 49  # 48 frames -> next 29 + 4n
    assert duration_value(grid, 0.1) == 29
    assert max_scene_seconds(grid) == Decimal("289") / 24


@pytest.mark.parametrize(
    ("model", "maximum"),
    [
        ("kwaivgi/kling-v2.1", "10"),
        ("minimax/hailuo-02", "10"),
        ("bytedance/seedance-1-lite", "12"),
        ("luma/ray-flash-2-720p", "9"),
        ("local/i2v", "10"),
    ],
)
def test_a_scene_longer_than_the_model_renders_is_refused(model: str, maximum: str) -> None:
    item = profile(model)
    with pytest.raises(SceneTooLong) as caught:
        billed_seconds(item, 12.5)
    message = str(caught.value)
    assert model in message
    assert f"the {maximum} s" in message
    assert "12.5 s" in message


def test_storyboard_checks_name_the_scene_before_anything_is_billed() -> None:
    kling = profile("kwaivgi/kling-v2.1")
    assert storyboard_billed_seconds(kling, [2, 7]) == [Decimal(5), Decimal(10)]
    with pytest.raises(SceneTooLong, match=r"^Scene 3 lasts 11 s, .* 10 s .*kling-v2.1"):
        storyboard_billed_seconds(kling, [2, 7, 11])
    with pytest.raises(SceneTooLong, match="^Scene 2 lasts 11 s"):
        estimate_cost(kling, [2, 11], settings())
    with pytest.raises(ProfileError, match="positive number of seconds"):
        billed_seconds(kling, 0)


def test_seed_cost_example_on_local_i2v() -> None:
    # 5 images x $0.003 + 5 x 2 s x $0.10 = $1.015, half-up: $1.02.
    assert estimate_cost(profile("local/i2v"), [2, 2, 2, 2, 2], settings()) == Decimal("1.02")


def test_cost_uses_billed_seconds_and_rounds_ties_up() -> None:
    # 5 x 0.9 s on the slideshow bills 4.5 s: 0.015 + 0.45 = 0.465 -> $0.47.
    assert estimate_cost(profile("local/slideshow"), [0.9] * 5, settings()) == Decimal("0.47")
    # The same scenes on local/i2v bill 1 s each: 0.015 + 0.50 = 0.515 -> $0.52.
    assert estimate_cost(profile("local/i2v"), [0.9] * 5, settings()) == Decimal("0.52")
    # Kling bills 5 s for a 2 s scene: 2 x 0.003 + 10 x 0.10 = 1.006 -> $1.01.
    assert estimate_cost(profile("kwaivgi/kling-v2.1"), [2, 2], settings()) == Decimal("1.01")
    # The actual cost of what was rendered, at the settings' prices.
    cheap = settings(price_per_image="0.01", price_per_video_second="0.05")
    wan = profile("wan-video/wan-2.2-i2v-fast")
    billed = [billed_seconds(wan, 2), billed_seconds(wan, 6.01)]  # 5.0625 + 6.0625 s
    assert billed_cost(wan, 2, billed, cheap) == Decimal("0.58")  # 0.02 + 0.55625


def test_validation_names_what_the_model_would_refuse() -> None:
    kling = profile("kwaivgi/kling-v2.1")
    with pytest.raises(InputRejected) as caught:
        validate_input(kling, {"start_image": IMAGE, "duration": 7, "mode": "ultra"})
    message = str(caught.value)
    assert message.startswith("kwaivgi/kling-v2.1 would refuse this input: ")
    assert "duration: 7 is not one of [5, 10]" in message
    assert "mode: 'ultra' is not one of ['standard', 'pro']" in message
    assert "'prompt' is a required property" in message
    with pytest.raises(InputRejected, match="duration: 13 is greater than the maximum of 12"):
        validate_input(profile("bytedance/seedance-1-lite"), {"prompt": "p", "duration": 13})
    with pytest.raises(InputRejected, match="width: 1279 is not a multiple of 2"):
        validate_input(profile("local/i2v"), {"image": IMAGE, "width": 1279})


def test_a_fixed_input_the_model_refuses_is_caught_before_a_create(tmp_path: Path) -> None:
    path = tmp_path / "profiles.json"
    path.write_text(
        json.dumps(
            {
                "model": "kwaivgi/kling-v2.1",
                "image_field": "start_image",
                "duration": {"kind": "choices", "seconds": [5, 10]},
                "fixed_input": {"mode": "1080p"},
            }
        )
    )
    kling = profile("kwaivgi/kling-v2.1", model_profiles_file=path)
    model_input = scene_input(kling, image_url=IMAGE, prompt="p", scene_seconds=3)
    with pytest.raises(InputRejected, match="mode: '1080p' is not one of"):
        validate_input(kling, model_input)


def test_extra_input_sits_between_fixed_inputs_and_the_scene() -> None:
    kling = profile("kwaivgi/kling-v2.1")
    model_input = scene_input(
        kling,
        image_url=IMAGE,
        prompt="p",
        scene_seconds=3,
        extra={"mode": "pro", "duration": 10, "start_image": "https://other/x.png"},
        negative_prompt="blur",
    )
    assert model_input == {
        "mode": "pro",
        "start_image": IMAGE,
        "prompt": "p",
        "duration": 5,
        "negative_prompt": "blur",
    }
    no_end = "^The profile of kwaivgi/kling-v2.1 has no field for a last frame$"
    with pytest.raises(ProfileError, match=no_end):
        scene_input(kling, image_url=IMAGE, prompt="p", scene_seconds=3, last_frame_url=IMAGE)
    hailuo = profile("minimax/hailuo-02")
    ends = scene_input(hailuo, image_url=IMAGE, prompt="p", scene_seconds=3, last_frame_url=IMAGE)
    assert ends["last_frame_image"] == IMAGE
    validate_input(hailuo, ends)


def test_a_profile_file_adds_a_model_through_the_setting(tmp_path: Path) -> None:
    schema = {
        "type": "object",
        "required": ["frame", "text"],
        "properties": {
            "frame": {"type": "string"},
            "text": {"type": "string"},
            "seconds": {"type": "integer", "enum": [4, 8]},
            "quality": {"type": "string", "enum": ["draft", "high"]},
        },
    }
    (tmp_path / "clip-schema.json").write_text(json.dumps(schema))
    path = tmp_path / "profiles.json"
    path.write_text(
        json.dumps(
            [
                {
                    "model": "acme/clip",
                    "image_field": "frame",
                    "prompt_field": "text",
                    "duration": {"kind": "choices", "field": "seconds", "seconds": [4, 8]},
                    "fixed_input": {"quality": "high"},
                    "price_per_second": "0.25",
                    "input_schema": "clip-schema.json",
                },
                {
                    "model": "kwaivgi/kling-v2.1",
                    "image_field": "start_image",
                    "duration": {"kind": "choices", "seconds": [5, 10]},
                    "fixed_input": {"mode": "pro"},
                    "price_per_second": "0.09",
                },
            ]
        )
    )
    clip = profile("acme/clip:v7", model_profiles_file=path)
    assert clip.model == "acme/clip:v7"
    model_input = scene_input(clip, image_url=IMAGE, prompt="walk", scene_seconds=5)
    assert model_input == {"quality": "high", "frame": IMAGE, "text": "walk", "seconds": 8}
    validate_input(clip, model_input)
    with pytest.raises(InputRejected, match="acme/clip would refuse this input: seconds"):
        validate_input(clip, {**model_input, "seconds": 5})
    # 1 image x $0.003 + 8 s x $0.25 = $2.003 -> $2.00
    assert estimate_cost(clip, [5], settings()) == Decimal("2.00")
    # The file overrides a built-in profile too; the others stay.
    kling = profile("kwaivgi/kling-v2.1", model_profiles_file=path)
    assert kling.fixed_input == {"mode": "pro"}
    assert estimate_cost(kling, [2], settings()) == Decimal("0.45")  # 0.003 + 5 x 0.09
    assert profile("local/i2v", model_profiles_file=path).name == "local/i2v"


def test_a_toml_profile_file(tmp_path: Path) -> None:
    path = tmp_path / "profiles.toml"
    path.write_text(
        """
[[profiles]]
model = "acme/slow"
image_field = "img"
prompt_field = "caption"
duration = { kind = "range", field = "length", min = 2, max = 20, step = 2 }
"""
    )
    slow = profile("acme/slow", model_profiles_file=str(path))
    assert scene_input(slow, image_url=IMAGE, prompt=None, scene_seconds=4.5) == {
        "img": IMAGE,
        "length": 6,
    }
    with pytest.raises(SceneTooLong, match="acme/slow"):
        billed_seconds(slow, 21)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"model": "acme/x", ', r"is not valid JSON: .* \(line 1, column 21\)"),
        ("[1, 2]", r"profile 1: .*valid dictionary"),
        (
            '{"model": "acme/x", "image_field": "i", "duration": {"kind": "weeks"}}',
            r"profile 1 \(acme/x\): duration: .*'choices', 'range', 'frames'",
        ),
        (
            '{"model": "acme/x", "image_field": "i", '
            '"duration": {"kind": "choices", "seconds": []}}',
            r"profile 1 \(acme/x\): duration\.choices\.seconds: List should have at least 1",
        ),
        (
            '{"model": "acme x", "image_field": "i", '
            '"duration": {"kind": "range", "min": 1, "max": 5}}',
            r"model: must be 'owner/name'",
        ),
        (
            '{"model": "acme/x", "image_field": "i", "colour": "red", '
            '"duration": {"kind": "range", "min": 1, "max": 5}}',
            r"colour: Extra inputs are not permitted",
        ),
        (
            '{"model": "acme/x", "image_field": "i", "fixed_input": {"duration": 3}, '
            '"duration": {"kind": "range", "min": 1, "max": 5}}',
            r"fixed_input sets duration, which the profile fills itself",
        ),
        (
            '[{"model": "acme/x", "image_field": "i", '
            '"duration": {"kind": "range", "min": 1, "max": 5}},'
            ' {"model": "acme/x:v2", "image_field": "j", '
            '"duration": {"kind": "range", "min": 1, "max": 5}}]',
            r"two profiles for acme/x",
        ),
        (
            '{"model": "acme/x", "image_field": "i", "input_schema": "missing.json", '
            '"duration": {"kind": "range", "min": 1, "max": 5}}',
            r"input_schema .*missing\.json does not exist",
        ),
    ],
)
def test_a_malformed_profile_file_gives_a_clear_error(
    tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "profiles.json"
    path.write_text(content)
    with pytest.raises(ProfileError, match=message) as caught:
        profile("acme/x", model_profiles_file=path)
    assert "MODEL_PROFILES_FILE" in str(caught.value)


def test_a_missing_profile_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="MODEL_PROFILES_FILE .*nope.json does not exist"):
        profile("local/i2v", model_profiles_file=tmp_path / "nope.json")
    # An empty setting means no file.
    assert profile("local/i2v", model_profiles_file="").name == "local/i2v"


def test_an_unknown_model_is_refused_at_startup_naming_the_setting_and_the_models() -> None:
    with pytest.raises(UnknownModel) as caught:
        profile("acme/mystery:123")
    message = str(caught.value)
    assert message.startswith("REPLICATE_MODEL acme/mystery:123 has no model profile")
    assert "MODEL_PROFILES_FILE" in message
    for item in BUILTIN_PROFILES:
        assert item.name in message


def test_the_old_field_settings_still_map_a_model_without_a_profile() -> None:
    legacy = profile("acme/old", model_images_field="frames", model_prompt_field="")
    assert not legacy.per_scene
    board = Storyboard.parse([{"image_url": "https://a/1.png", "prompt": "x"}])
    assert storyboard_input(legacy, board.scenes, extra={"fps": 8}) == {
        "fps": 8,
        "frames": ["https://a/1.png"],
        "durations": [2.0],
    }
    validate_input(legacy, {"anything": True})  # no schema: nothing to check against


def test_an_invalid_inline_schema_is_refused() -> None:
    with pytest.raises(ValueError, match="input_schema is not a valid JSON Schema"):
        ModelProfile.model_validate(
            {
                "model": "acme/x",
                "image_field": "i",
                "duration": {"kind": "range", "min": 1, "max": 5},
                "input_schema": {"type": "thing"},
            }
        )
