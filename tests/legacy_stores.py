"""Job stores as the first release left them: its exact DDL (what its create_all emitted,
whitespace aside: commit c9224aa's backend/database.py, with the SQLModel the project installs)
and its kind of data, a completed job with its cost and a failed one."""

from __future__ import annotations

import sqlalchemy
from sqlalchemy.pool import NullPool

FIRST_RELEASE_DDL = {
    "sqlite": [
        """CREATE TABLE video_jobs (
	id INTEGER NOT NULL,
	status VARCHAR(16) NOT NULL,
	approved BOOLEAN NOT NULL,
	storyboard_data TEXT,
	video_url VARCHAR,
	actual_cost NUMERIC(12, 2),
	current_stage VARCHAR NOT NULL,
	progress_message VARCHAR NOT NULL,
	scenes_total INTEGER NOT NULL,
	scenes_completed INTEGER NOT NULL,
	error_message TEXT,
	download_retries INTEGER NOT NULL,
	prediction_id VARCHAR(128),
	workflow_id VARCHAR(128),
	created_at DATETIME NOT NULL,
	updated_at DATETIME NOT NULL,
	PRIMARY KEY (id)
)""",
        "CREATE INDEX ix_video_jobs_status ON video_jobs (status)",
    ],
    "postgresql": [
        """CREATE TABLE video_jobs (
	id SERIAL NOT NULL,
	status VARCHAR(16) NOT NULL,
	approved BOOLEAN NOT NULL,
	storyboard_data TEXT,
	video_url VARCHAR,
	actual_cost NUMERIC(12, 2),
	current_stage VARCHAR NOT NULL,
	progress_message VARCHAR NOT NULL,
	scenes_total INTEGER NOT NULL,
	scenes_completed INTEGER NOT NULL,
	error_message TEXT,
	download_retries INTEGER NOT NULL,
	prediction_id VARCHAR(128),
	workflow_id VARCHAR(128),
	created_at TIMESTAMP WITH TIME ZONE NOT NULL,
	updated_at TIMESTAMP WITH TIME ZONE NOT NULL,
	PRIMARY KEY (id)
)""",
        "CREATE INDEX ix_video_jobs_status ON video_jobs (status)",
    ],
}

STORYBOARD = (
    '{"scenes":[{"image_url":"https://images.example.com/1.jpg","prompt":"Sunrise",'
    '"duration_seconds":5.0},{"image_url":"https://images.example.com/2.jpg","prompt":null,'
    '"duration_seconds":5.0}]}'
)

# The rows as that release wrote them (ids from the table's own sequence): job 1 rendered and
# was billed, job 2 failed validation.
FIRST_RELEASE_JOBS = [
    {
        "status": "completed",
        "approved": True,
        "storyboard_data": STORYBOARD,
        "video_url": "/api/videos/1/data",
        "actual_cost": "1.01",
        "current_stage": "completed",
        "progress_message": "Video ready",
        "scenes_total": 2,
        "scenes_completed": 2,
        "error_message": None,
        "download_retries": 1,
        "prediction_id": "first-release-prediction",
        "workflow_id": "render-video-1",
        "created_at": "2026-11-24 21:40:00",
        "updated_at": "2026-11-24 21:41:30",
    },
    {
        "status": "failed",
        "approved": True,
        "storyboard_data": '{"scenes":[{"image_url":null,"prompt":"Dusk","duration_seconds":5.0}]}',
        "video_url": None,
        "actual_cost": None,
        "current_stage": "validating",
        "progress_message": "Render failed",
        "scenes_total": 1,
        "scenes_completed": 0,
        "error_message": "Scene 1 is missing image",
        "download_retries": 0,
        "prediction_id": None,
        "workflow_id": "render-video-2",
        "created_at": "2026-11-24 21:45:00",
        "updated_at": "2026-11-24 21:45:02",
    },
]


def make_first_release_store(url: str) -> None:
    """Makes the first release's schema at `url` (an empty database) and its two jobs."""
    engine = sqlalchemy.create_engine(url, poolclass=NullPool)
    columns = list(FIRST_RELEASE_JOBS[0])
    insert = sqlalchemy.text(
        f"INSERT INTO video_jobs ({', '.join(columns)}) "
        f"VALUES ({', '.join(':' + column for column in columns)})"
    )
    try:
        with engine.begin() as conn:
            for statement in FIRST_RELEASE_DDL[engine.dialect.name]:
                conn.exec_driver_sql(statement)
            for job in FIRST_RELEASE_JOBS:
                stamp = {"created_at", "updated_at"}
                # PostgreSQL's column has a zone; SQLite stored the UTC time as text.
                suffix = "+00:00" if engine.dialect.name == "postgresql" else ".000000"
                conn.execute(insert, {k: v + suffix if k in stamp else v for k, v in job.items()})
    finally:
        engine.dispose()
