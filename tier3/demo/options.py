"""What ``tier3 demo`` was asked to do (:class:`DemoOptions`), and what it set up for this run (:class:`Session`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from schemas.settings import KafkaSettings

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = REPO_ROOT / "examples" / "widget_selector"


class DemoError(Exception):
    """The demo cannot go on (missing example files, a process that died at start, ...)."""


@dataclass(frozen=True)
class DemoOptions:
    """The command line of ``tier3 demo`` (``tier3/demo/run.py`` documents each option)."""

    examples_path: Path = EXAMPLES_DIR / "experiences.jsonl"
    recorded_path: Path = EXAMPLES_DIR / "recorded_teacher.jsonl"
    limit: int = 0  # publish only the first N example experiences (0 = all)
    publish_seconds: float = 60.0
    keep_running: bool = False
    timeout_s: float = 1500.0
    sample_rate: float = 0.3
    window_s: int = 15
    summary_json: Path | None = None
    eval_wait_s: float = 30.0
    export_wait_s: float = 600.0
    promote: bool = False
    ab_prompts: int = 8  # the A/B phase's prompts through the router (0 = no A/B phase)
    ab_max_tokens: int = 128  # max output tokens of one student answer in the A/B phase
    shadow_rate: float = 1.0  # TIER3_SHADOW_RATE of the demo's worker: every student answer is scored
    ab_wait_s: float = 60.0  # wait this long for /status to count the A/B phase's shadow samples


@dataclass(frozen=True)
class Session:
    """What the demo set up for this run: its topics and folder, what it expects."""

    settings: KafkaSettings  # with the run's topic prefix, data folder and bootstrap servers
    run_name: str
    demo_dir: Path
    web_port: int  # the worker's web server: /status, /metrics and the dashboard
    trainer_group: str
    n_examples: int
    expected_sampled: int  # the experiences the worker will sample (the same pure function it uses)

    @property
    def status_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/status"
