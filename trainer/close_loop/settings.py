"""Settings of the close-the-loop steps: evaluation, the promotion gate, GGUF export, serving, Ollama registration.

Field name == environment variable name (``tier3_gate_min_json_valid`` reads ``TIER3_GATE_MIN_JSON_VALID``).
A subclass of the trainer's settings (``tier3_student_name`` names the Ollama model, versions are tagged
``<name>:v<N>``; ``runs_dir`` holds the run folders), so the ``tier3 eval|promote|rollback|export`` commands
build one object per process; the trainer process can build this one instead of its own to run the gate after
each run.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from trainer.settings import TrainerSettings


class CloseLoopSettings(TrainerSettings):
    # --- evaluation --------------------------------------------------------------------------------------
    tier3_eval_max_new_tokens: int = Field(256, ge=1, le=8192, description="generation bound per holdout "
                                           "example (tokens); greedy decoding")
    tier3_eval_max_examples: int = Field(0, ge=0, description="evaluate at most this many holdout examples "
                                         "(0 = all); the first ones in holdout order")
    tier3_eval_batch_size: int = Field(8, ge=1, le=512, description="holdout prompts generated together (left "
                                       "padding, KV cache) by the merged student")
    tier3_eval_latency_samples: int = Field(3, ge=0, le=1000, description="holdout examples also generated one "
                                            "at a time: their wall times are the latency p50/p95 the gate checks")
    tier3_task: str = Field("widget_selector", description="task whose answer schema scores the outputs")
    tier3_golden_set: Path | None = Field(None, description="the user's own evaluation set: a JSONL file of "
                                          "requests ('messages' as production sends them) with reference answers "
                                          "('answer'), evaluated at every gate as its own slice "
                                          "(examples/widget_selector/golden.jsonl is the example's)")
    tier3_eval_f16: bool = Field(True, description="also evaluate the f16 GGUF on the same items, to report the "
                                 "serving quantisation's cost (a diagnostic, never the decision)")
    tier3_student_max_tokens: int = Field(512, ge=1, description="max output tokens of one student call: the "
                                          "router's setting, which the served evaluation asks with too")

    # --- promotion gate ----------------------------------------------------------------------------------
    tier3_gate_min_examples: int = Field(5, ge=0, description="a candidate evaluated on fewer holdout examples "
                                         "is rejected (too little evidence)")
    tier3_gate_min_json_valid: float = Field(0.95, ge=0.0, le=1.0, description="minimum JSON validity rate")
    tier3_gate_min_schema_valid: float = Field(0.90, ge=0.0, le=1.0, description="minimum answer-schema "
                                               "validity rate")
    tier3_gate_baseline_margin: float = Field(0.05, ge=0.0, le=1.0, description="non-inferiority margin on the "
                                              "task's primary metric: the paired interval's lower bound of (student "
                                              "- production) must be >= -margin (inclusive)")
    tier3_gate_require_beat_promoted: bool = Field(True, description="the candidate must also be no worse within "
                                                   "the margin than the version in force, paired on the same items")
    tier3_gate_max_latency_p95_ms: float = Field(5000.0, gt=0.0, description="maximum served latency p95 (ms) on "
                                                 "the holdout, inclusive")
    tier3_gate_confidence: float = Field(0.95, gt=0.5, lt=1.0, description="confidence level of the paired "
                                         "bootstrap interval the gate's verdict uses")
    tier3_gate_min_paired: int = Field(10, ge=2, description="paired comparisons on fewer items say "
                                       "'not enough evidence' (the run waits for more traces)")
    tier3_gate_min_golden: float = Field(0.5, ge=0.0, le=1.0, description="minimum primary metric on the golden "
                                         "set (inclusive), when TIER3_GOLDEN_SET is set; it must also beat the "
                                         "constant answer's")
    # --- online evaluation and automatic rollback (`tier3 watch`, trainer/close_loop/online_watch.py) ---------
    tier3_online_windows: int = Field(3, ge=1, le=1000, description="roll back when this many consecutive "
                                      "eligible windows (see TIER3_ONLINE_MIN_N) of the promoted version are each "
                                      "at or below the bound (value <= bound), and their pooled value too")
    tier3_online_min_n: int = Field(20, ge=1, description="a window counts only with at least this many shadow "
                                    "traces of the promoted version")
    tier3_online_min_f1: float = Field(0.5, ge=0.0, le=1.0, description="absolute bound on the task's primary "
                                       "metric online vs the teacher (task_f1 for the widget selector): a window "
                                       "at or below it fails, so the promoted version must stay strictly above it")
    tier3_online_min_fraction: float = Field(0.8, ge=0.0, le=1.0, description="relative bound: this fraction of "
                                             "the version's offline holdout figure of the same metric (task_f1, f1 "
                                             "when the evaluation lacks it); the bound is the larger of the two, "
                                             "a window at or below it fails (0 = only TIER3_ONLINE_MIN_F1)")
    tier3_watch_interval_s: float = Field(10.0, gt=0.0, description="how often `tier3 watch` reads online-eval "
                                          "and training-runs and judges the promoted version (s)")
    tier3_auto_export: bool = Field(True, description="register a promoted version's GGUF with Ollama right "
                                    "after its promotion (the export itself always precedes the gate)")

    # --- export ------------------------------------------------------------------------------------------
    tier3_ollama_stable_tag: str = Field("latest", description="tag moved to each newly exported version "
                                         "(<name>:<tag>); empty = none")
    tier3_ollama_host: str = Field("http://127.0.0.1:11434", description="Ollama server for registration")
    tier3_gguf_quant: str = Field("q8_0", description="quantised GGUF type written beside f16 (converter "
                                  "--outtype: q8_0, bf16, tq1_0, tq2_0)")
    tier3_gguf_pre_tokenizer: str | None = Field(None, description="llama.cpp pre-tokenizer name to declare when "
                                                 "the converter does not recognise the tokenizer (tiny test "
                                                 "models); real upstream tokenizers need none")
    tier3_llama_cpp_dir: Path | None = Field(None, description="folder with convert_hf_to_gguf.py, conversion/ "
                                             "and gguf-py/; default: extracted once from the llama-cpp-python "
                                             "source distribution into $XDG_CACHE_HOME/tier3/tools "
                                             "(~/.cache/tier3/tools), shared by every data dir")
    tier3_llama_cpp_python_version: str = Field("0.3.36", description="llama-cpp-python sdist that carries the "
                                                "converter (pip download, never built)")

    # --- serving (`tier3 serve`: llama-cpp-python's OpenAI-compatible server on the exported GGUF) ---------
    tier3_serve_host: str = Field("127.0.0.1", description="address `tier3 serve` listens on")
    tier3_serve_port: int = Field(8088, ge=0, le=65535, description="port of `tier3 serve` (0 = a free one); "
                                  "the router's TIER3_STUDENT_BASE_URL points here by default")
    tier3_serve_n_ctx: int = Field(4096, ge=256, description="context length (tokens) of the served model")
    tier3_serve_threads: int = Field(0, ge=0, description="CPU threads of the server (0 = all cores), shared out "
                                     "among the replicas")
    tier3_serve_replicas: int = Field(1, ge=1, le=64, description="servers `tier3 serve` starts on consecutive "
                                      "ports (each answers one request at a time; the router spreads its calls "
                                      "over every URL of TIER3_STUDENT_BASE_URL)")
    tier3_serve_start_timeout_s: float = Field(180.0, gt=0.0, description="wait this long for the server to "
                                               "load the model and answer")

    @property
    def reports_dir(self) -> Path:
        return self.tier3_data_dir / "reports"

    @property
    def exports_dir(self) -> Path:
        return self.tier3_data_dir / "exports"
