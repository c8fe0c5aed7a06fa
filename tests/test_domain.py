"""Pure domain rules: the seed's cost formula and storyboard messages."""

from __future__ import annotations

from decimal import Decimal

import pytest

from backend.cost import render_cost
from backend.settings import Settings
from backend.storyboard import Storyboard, StoryboardError


def test_seed_cost_example() -> None:
    # 5 x $0.003 + 10 x $0.10 = $1.015, rounded half-up to $1.02.
    assert render_cost(5, 10) == Decimal("1.02")


@pytest.mark.parametrize(
    ("images", "seconds", "cost"),
    [
        (0, 0, "0.00"),
        (1, 0, "0.00"),
        (2, 0, "0.01"),
        (5, 10.0, "1.02"),
        (3, 4.5, "0.46"),
        # Ties beyond the seed's example round half-up too: $0.465 -> $0.47, $0.025 -> $0.03.
        (5, 4.5, "0.47"),
        (5, 0.1, "0.03"),
        (15, 1.5, "0.20"),
        # Float-looking seconds are taken as written, not as their binary approximation.
        (1, 0.145, "0.02"),
    ],
)
def test_cost_rounds_half_up_to_cents(images: int, seconds: float, cost: str) -> None:
    assert render_cost(images, seconds) == Decimal(cost)


def test_storyboard_forms() -> None:
    scenes = [{"image_url": "http://a/1.png"}]
    assert Storyboard.parse(scenes) == Storyboard.parse({"scenes": scenes})
    assert (
        Storyboard.parse('{"scenes": [{"image_url": "https://a/1.png"}]}')
        .scenes[0]
        .duration_seconds
        == 2
    )


def test_missing_image_names_the_scene() -> None:
    board = Storyboard.parse([{"image_url": "http://a/1.png"}, {"image_url": ""}, {}])
    with pytest.raises(StoryboardError, match="^Scene 2 is missing image$"):
        board.require_images()


def test_empty_storyboard() -> None:
    with pytest.raises(StoryboardError, match="^No storyboard data available$"):
        Storyboard.parse([]).require_images()


def test_settings_defaults(tmp_path) -> None:
    settings = Settings(_env_file=None, data_dir=tmp_path)  # type: ignore[call-arg]
    assert settings.poll_interval_seconds == 5
    assert settings.render_timeout_seconds == 600
    assert settings.price_per_image == Decimal("0.003")
    assert settings.price_per_video_second == Decimal("0.10")
    assert settings.max_video_bytes == 2 * 1024**3
    assert settings.resolved_database_url.endswith("/jobs.db")
    assert settings.uses_local_renderer
    assert settings.provider_base_url == "http://127.0.0.1:5055"


def test_model_reference_is_checked() -> None:
    assert Settings(_env_file=None, replicate_model="a/b:123").replicate_model == "a/b:123"  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="owner/name"):
        Settings(_env_file=None, replicate_model="just-a-name")  # type: ignore[call-arg]
