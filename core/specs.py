"""Job specs: one definition, used by the API to validate and by workers to run."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    field_validator,
    model_validator,
)

from core.enums import (
    BatchEndpoint,
    FineTuneMethod,
    FineTuneObjective,
    FineTuneTask,
    JobKind,
    PredictMode,
    Tracker,
    WebhookEvent,
)
from core.graders import Grader
from core.response_format import ResponseFormat, grammar_schema
from core.tools import (
    MAX_TOOLS,
    NamedToolChoice,
    Tool,
    ToolCall,
    ToolChoice,
    call_schema,
    forced_function,
)

MAX_SEQUENCES_PER_JOB = 1024
MAX_TOP_LOGPROBS = 20  # OpenAI's limit for chat completions
MAX_LOGIT_BIASES = 1024  # token ids one request may bias
MODEL_REF_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._\-/:]{0,254}$"
_BLANK = re.compile(r"^\s*$")

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=32_000)]
StopSequence = Annotated[str, StringConstraints(min_length=1, max_length=200)]
MetadataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
]
MetadataValue = Annotated[str, StringConstraints(max_length=512)] | int | float | bool | None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: Annotated[str, StringConstraints(max_length=32_000)]
    # left out of the dump when unset: a chat template that tests `'name' in message` sees
    # no name, and stored specs and idempotency fingerprints are those of before it existed
    name: Annotated[str, StringConstraints(min_length=1, max_length=64)] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="Who wrote the message, given to the chat template (many ignore it).",
    )
    tool_calls: list[ToolCall] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TOOLS,
        exclude_if=lambda value: value is None,
        description="An assistant message's calls to tools, given back in the conversation.",
    )
    tool_call_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="A tool message's: the id of the call it answers.",
    )

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> Self:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message makes tool_calls")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("a tool message (and only a tool message) needs a tool_call_id")
        return self


class RetrievalSpec(BaseModel):
    """Past question/answer pairs from a dataset, the k most similar to the question,
    put into the system message before the chat template is applied."""

    model_config = ConfigDict(extra="forbid")

    dataset: Annotated[str, StringConstraints(pattern=r"^ds_[0-9a-f]{32}$")] = Field(
        description="A chat or prompt_completion dataset holding the past Q&A."
    )
    k: int = Field(default=3, ge=1, le=20)
    embedding_model: str = Field(
        pattern=MODEL_REF_PATTERN,
        description="A sentence encoder (mean-pooled AutoModel): a model directory name, "
        "a registered model or a hub id, e.g. all-MiniLM-L6-v2.",
    )

    @field_validator("embedding_model")
    @classmethod
    def _no_parent_segments(cls, model: str) -> str:
        if ".." in model.split("/"):
            raise ValueError("embedding_model may not contain '..' segments")
        return model


class GenerateSpec(BaseModel):
    """Prompts to complete with a causal language model."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        pattern=MODEL_REF_PATTERN,
        description="A model directory name under the data dir's models/, a path, or a hub id.",
    )
    prompts: list[Prompt] | None = Field(default=None, min_length=1, max_length=256)
    messages: list[list[ChatMessage]] | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Conversations to continue with the chat template (instead of prompts).",
    )
    prompt_token_ids: (
        list[Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1, max_length=32_768)]]
        | None
    ) = Field(
        default=None,
        min_length=1,
        max_length=256,
        exclude_if=lambda value: value is None,
        description="Prompts given as the model's own token ids, fed as given (no special "
        "tokens added; instead of prompts), as OpenAI's completions take them.",
    )
    chat: bool = Field(
        default=False, description="Wrap each prompt as a user message with the chat template."
    )
    store_text: bool = Field(
        default=True,
        description="Keep the generated texts in the outputs table. False: only their token "
        "counts, lengths and finish reasons are kept; the text reaches readers only over the "
        "job's token stream, so it is not durable (a reader that misses it cannot get it back).",
    )
    max_new_tokens: int = Field(
        default=64,
        ge=0,
        le=4096,
        description="At most this many tokens per sequence; 0 (with prompt_logprobs) scores "
        "the prompts only.",
    )
    fit_max_new_tokens: bool = Field(
        default=False,
        description="Shorten max_new_tokens, prompt by prompt, to what the model's context "
        "leaves after the prompt, instead of refusing a prompt with which it does not fit "
        "(OpenAI's chat default when a request sets no max tokens).",
    )
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, description="0 means greedy.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=1000, description="0 disables top-k filtering.")
    repetition_penalty: float = Field(default=1.0, ge=0.5, le=2.0)
    frequency_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from a token's logit once per time it was generated.",
    )
    presence_penalty: float = Field(
        default=0.0,
        ge=-2.0,
        le=2.0,
        description="OpenAI's: subtracted from a token's logit once it was generated at all.",
    )
    logit_bias: dict[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=-100.0, le=100.0)]] = (
        Field(
            default_factory=dict,
            max_length=MAX_LOGIT_BIASES,
            # left out of the dump when empty: stored specs and idempotency fingerprints of
            # requests without biases are those of before it existed
            exclude_if=lambda value: not value,
            description="OpenAI's: token id -> a bias from -100 to 100 added to that token's logit "
            "before sampling (-100 bans it, 100 all but forces it).",
        )
    )
    num_return_sequences: int = Field(default=1, ge=1, le=16)
    seed: int | None = Field(
        default=None,
        ge=-(2**63),
        le=2**63 - 1,
        description="Any 64-bit integer, as OpenAI's: the same seed gives the same texts.",
    )
    stop: list[StopSequence] = Field(default_factory=list, max_length=8)
    retrieval: RetrievalSpec | None = Field(
        default=None,
        description="Put the most similar past answers into the prompt (chat template only).",
    )
    response_format: ResponseFormat | None = Field(
        default=None,
        description="OpenAI's: json_object or json_schema output, enforced while decoding.",
    )
    tools: list[Tool] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_TOOLS,
        exclude_if=lambda value: value is None,
        description="OpenAI's function tools, shown to the model through its chat template "
        "(or its system message, where the template shows none); needs tool_choice.",
    )
    tool_choice: ToolChoice | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="none: answer in text; required: call one or more of the tools; "
        "{type: function, function: {name}}: call that one (a forced call is decoded under "
        "its arguments' schema, so it always parses and validates); auto: the model "
        "decides, for a model whose chat template shows Hermes' <tool_call> format.",
    )
    parallel_tool_calls: bool | None = Field(
        default=None,
        exclude_if=lambda value: value is None,
        description="With tool_choice required: false allows one call only (default true).",
    )
    logprobs: bool = Field(
        default=False,
        description="Return each generated token's log probability under the model's own "
        "distribution (log_softmax of its logits, before temperature, top-p/k, penalties, "
        "logit biases and any response format's mask).",
    )
    top_logprobs: int = Field(
        default=0,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="Also return this many most likely tokens at each position (needs logprobs).",
    )
    prompt_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        exclude_if=lambda value: value is None,
        description="Also return each prompt token's log probability under the model (the "
        "first token has none) with this many most likely tokens at each position, in each "
        "output's data.prompt_logprobs (OpenAI's completions with echo).",
    )

    @field_validator("model")
    @classmethod
    def _no_parent_segments(cls, model: str) -> str:
        if ".." in model.split("/"):
            raise ValueError("model may not contain '..' segments")
        return model

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top: int, info: ValidationInfo) -> int:
        if top > 0 and not info.data.get("logprobs", False):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @field_validator("prompts")
    @classmethod
    def _no_blank_prompts(cls, prompts: list[str] | None) -> list[str] | None:
        for i, p in enumerate(prompts or []):
            if _BLANK.match(p):
                raise ValueError(f"prompt {i} is blank")
        return prompts

    @model_validator(mode="after")
    def _sampling_consistent(self) -> GenerateSpec:
        given = [self.prompts, self.messages, self.prompt_token_ids]
        if sum(g is not None for g in given) != 1:
            raise ValueError("give exactly one of prompts, messages or prompt_token_ids")
        if self.prompt_token_ids is not None and self.chat:
            raise ValueError("prompt_token_ids are fed as given; chat needs text prompts")
        if self.prompt_count * self.num_return_sequences > MAX_SEQUENCES_PER_JOB:
            raise ValueError(
                f"{self.prompt_count} prompts x num_return_sequences {self.num_return_sequences} "
                f"is more than {MAX_SEQUENCES_PER_JOB} sequences per job; split the job"
            )
        if self.retrieval is not None and not self.uses_chat_template:
            raise ValueError("retrieval needs messages or chat=true (it adds a system message)")
        if self.max_new_tokens == 0 and self.prompt_logprobs is None:
            raise ValueError("max_new_tokens 0 scores the prompts only: it needs prompt_logprobs")
        if self.temperature == 0 and self.num_return_sequences > 1:
            raise ValueError("num_return_sequences > 1 needs temperature > 0 (greedy is unique)")
        self._check_tools()
        return self

    def _check_tools(self) -> None:
        if self.tools is None:
            if self.tool_choice is not None or self.parallel_tool_calls is not None:
                raise ValueError("tool_choice and parallel_tool_calls need tools")
            return
        if not self.uses_chat_template:
            raise ValueError("tools need messages (they reach the model through its chat template)")
        names = [t.function.name for t in self.tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: two functions have the same name")
        if self.tool_choice is None:
            raise ValueError("tools need a tool_choice: none, auto, required or a named function")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and forced_function(self.tools, choice) is None:
            raise ValueError(
                f"tool_choice names {choice.function.name!r}, which is not one of the tools"
            )
        if self.tool_choice != "none" and grammar_schema(self.response_format) is not None:
            raise ValueError("tool calls and a JSON response_format cannot both shape the answer")

    @property
    def calls_tools(self) -> bool:
        """The answer is a call (tool_choice required or named), decoded under its schema."""
        return self.tools is not None and self.tool_choice not in (None, "none", "auto")

    @property
    def output_schema(self) -> dict[str, Any] | None:
        """The JSON Schema decoding enforces: a forced call's, or the response format's."""
        if self.calls_tools:
            assert self.tools is not None
            return call_schema(self.tools, self.tool_choice, self.parallel_tool_calls is not False)
        return grammar_schema(self.response_format)

    @property
    def do_sample(self) -> bool:
        return self.temperature > 0

    @property
    def prompt_count(self) -> int:
        return len(self.prompts or self.messages or self.prompt_token_ids or [])

    @property
    def uses_chat_template(self) -> bool:
        return self.chat or self.messages is not None


class NoopSpec(BaseModel):
    """A job that only waits: probes the pipeline end to end and measures its overhead."""

    model_config = ConfigDict(extra="forbid")

    duration_s: float = Field(default=0.0, ge=0.0, le=3600.0)


DatasetId = Annotated[str, StringConstraints(pattern=r"^ds_[0-9a-f]{32}$")]


class Hyperparameters(BaseModel):
    """Training settings. In a fine-tune spec, a field the request leaves out takes its
    task's default where TASK_HYPERPARAMETER_DEFAULTS names one, else the default here."""

    model_config = ConfigDict(extra="forbid")

    epochs: float = Field(default=3.0, gt=0, le=100)
    batch_size: int = Field(default=8, ge=1, le=512)
    learning_rate: float = Field(default=5e-5, gt=0, le=1)
    warmup: float = Field(default=0.0, ge=0, le=0.5, description="Fraction of steps warming up.")
    weight_decay: float = Field(default=0.0, ge=0, le=1)
    max_length: int = Field(default=128, ge=8, le=4096, description="Tokens per example.")
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=256)
    seed: int = Field(default=42, ge=0, le=2**32 - 1)
    max_steps: int | None = Field(default=None, ge=1, le=1_000_000, description="Overrides epochs.")
    eval_steps: int | None = Field(
        default=None, ge=1, description="Evaluate every N steps; default once per epoch."
    )
    checkpoint_steps: int | None = Field(
        default=None, ge=1, description="Checkpoint every N steps; default at each evaluation."
    )
    checkpoint_minutes: float | None = Field(
        default=None, gt=0, le=1440, description="Also checkpoint when this much time passed."
    )
    packing: bool = Field(
        default=False,
        description="causal_lm: pack several examples into each training sequence of "
        "max_length tokens (positions restart per example; no example attends to another); "
        "batch_size then counts packed sequences. Validation stays one example per row.",
    )
    train_on_inputs: bool = Field(
        default=False,
        description="causal_lm: also learn what the model is given, not only what it answers: "
        "a chat row's system and user turns (and its assistant messages of weight 0), a "
        "prompt/completion row's prompt. Off by default, as OpenAI's fine-tuning trains.",
    )


_SUPERVISED_LM_ONLY = ("packing", "train_on_inputs")  # hyperparameters of causal_lm supervised


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=8, ge=1, le=256)
    alpha: int = Field(default=16, ge=1, le=1024)
    dropout: float = Field(default=0.05, ge=0, le=0.9)
    target_modules: (
        list[Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.]{1,64}$")]] | None
    ) = Field(default=None, max_length=32, description="Default: the model type's usual modules.")


class DpoSpec(BaseModel):
    """Direct preference optimization (TRL's DPOTrainer, sigmoid loss): the policy learns to
    give the chosen answer more probability than the rejected one, relative to a reference,
    the starting weights (a frozen copy for method full; for lora/adalora the model with the
    new adapter disabled, or a frozen copy of the LoRA adapter it continues)."""

    model_config = ConfigDict(extra="forbid")

    beta: float = Field(
        default=0.1,
        gt=0,
        le=10,
        description="How far the policy may move from the reference: higher keeps it closer.",
    )


class ReinforcementSpec(BaseModel):
    """Reinforcement fine-tuning (TRL's GRPOTrainer): for each prompt the policy samples
    `generations` completions, the grader scores each, and the policy learns to make the
    completions that scored above their group's mean more likely."""

    model_config = ConfigDict(extra="forbid")

    grader: Grader
    generations: int = Field(
        default=4,
        ge=2,
        le=64,
        description="Completions sampled per prompt (a group; GRPO needs at least 2).",
    )
    max_completion_tokens: int = Field(
        default=64,
        ge=1,
        le=4095,
        description="Tokens per sampled completion at most; a prompt longer than the rest of "
        "hyperparameters.max_length loses its start.",
    )
    temperature: float = Field(
        default=1.0, gt=0, le=2.0, description="Sampling temperature of the completions."
    )


class EarlyStoppingSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    patience: int = Field(default=3, ge=1, le=100, description="Evaluations without improvement.")
    threshold: float = Field(default=0.0, ge=0)


class ExactMatchSpec(BaseModel):
    """Exact match of generated completions at every evaluation of a causal LM: the model
    completes the prompts of the first `examples` validation rows (prompt_completion rows,
    or chat rows up to their last assistant turn) greedily, and `eval_exact_match` is the
    share whose completion equals the reference after stripping surrounding whitespace."""

    model_config = ConfigDict(extra="forbid")

    examples: int = Field(
        default=32, ge=1, le=1000, description="Validation rows scored (the first ones)."
    )
    max_new_tokens: int = Field(
        default=64, ge=1, le=1024, description="Tokens generated per completion at most."
    )


class CheckpointRef(BaseModel):
    model_config = ConfigDict(extra="forbid")

    job_id: Annotated[str, StringConstraints(pattern=r"^job_[0-9a-f]{32}$")]
    step: int | None = Field(default=None, ge=1, description="Default: the latest checkpoint.")


SUFFIX_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,63}$"  # as OpenAI's: up to 64, `custom_suffix`

EVAL_METRICS: dict[FineTuneTask, tuple[str, ...]] = {
    FineTuneTask.CAUSAL_LM: ("eval_loss", "eval_perplexity"),
    FineTuneTask.SEQUENCE_CLASSIFICATION: (
        "eval_loss",
        "eval_accuracy",
        "eval_f1_macro",
        "eval_f1_weighted",
        "eval_precision_macro",
        "eval_recall_macro",
    ),
    FineTuneTask.TOKEN_CLASSIFICATION: (
        "eval_loss",
        "eval_f1",
        "eval_precision",
        "eval_recall",
        "eval_accuracy",
    ),
}
"""What each evaluation during a fine-tune reports, per task (workers/training/reports.py
computes them; NER's are seqeval's entity-level micro averages)."""
DEFAULT_METRIC_FOR_BEST_MODEL = {
    FineTuneTask.CAUSAL_LM: "eval_loss",
    FineTuneTask.SEQUENCE_CLASSIFICATION: "eval_f1_macro",
    FineTuneTask.TOKEN_CLASSIFICATION: "eval_f1",
}
EXACT_MATCH_METRIC = "eval_exact_match"
"""Reported by causal-LM evaluations of a spec with `exact_match` (ExactMatchSpec)."""
LOWER_IS_BETTER = frozenset({"eval_loss", "eval_perplexity"})
REINFORCEMENT_EVAL_METRICS = ("eval_reward",)
"""What each evaluation of a reinforcement job reports that can pick the kept checkpoint:
the grader's mean score on the validation prompts (its loss says nothing of quality)."""

TASK_HYPERPARAMETER_DEFAULTS: dict[FineTuneTask, dict[str, float]] = {
    FineTuneTask.TOKEN_CLASSIFICATION: {"learning_rate": 2e-4, "epochs": 5.0, "warmup": 0.1},
}
"""Defaults that differ by task (the others are Hyperparameters'). Token classification:
small encoders (MiniLM, BERT) on a few hundred to a few thousand tagged sentences learn
entities only after several passes at a learning rate well above 5e-5; a short warmup
keeps the freshly initialised tagging head from wrecking the encoder in the first steps,
and the best evaluated checkpoint (seqeval f1) is kept, so the later epochs cost time,
not quality. Measured in bench/README.md (row Q1)."""


def default_hyperparameters(task: FineTuneTask) -> Hyperparameters:
    """What a fine-tune of `task` runs with when its request names no hyperparameter."""
    return Hyperparameters.model_validate(TASK_HYPERPARAMETER_DEFAULTS.get(task, {}))


class FineTuneSpec(BaseModel):
    """Fine-tune a base model (path, hub id or registered model) on uploaded datasets."""

    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(pattern=MODEL_REF_PATTERN)
    task: FineTuneTask
    training_dataset: DatasetId
    validation_dataset: DatasetId | None = None
    validation_split: float = Field(
        default=0.1, ge=0.0, le=0.5, description="Held out of training when no validation set."
    )
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    method: FineTuneMethod = Field(
        default=FineTuneMethod.FULL,
        description="Which weights change: all (full) or a LoRA/AdaLoRA adapter's.",
    )
    objective: FineTuneObjective = Field(
        default=FineTuneObjective.SUPERVISED,
        description="What training optimizes: supervised (the loss on the rows' text or "
        "labels), dpo (preference pairs of a preference dataset; task causal_lm) or "
        "reinforcement (completions scored by a grader; a reinforcement dataset; causal_lm).",
    )
    dpo: DpoSpec | None = Field(
        default=None, description="DPO settings (objective dpo only); defaults when left out."
    )
    reinforcement: ReinforcementSpec | None = Field(
        default=None,
        description="The grader and sampling of objective reinforcement (required with it).",
    )
    lora: LoraSpec = Field(default_factory=LoraSpec)
    exact_match: ExactMatchSpec | None = Field(
        default=None,
        description="causal_lm, objective supervised: also score greedy completions of "
        "held-out prompts against their references at every evaluation (`exact_match`, "
        "selectable as metric_for_best_model). Off by default: it generates text.",
    )
    metric_for_best_model: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9_]{1,64}$",
        description="The evaluation metric that picks the checkpoint kept as the model (and "
        "that early stopping watches), with or without its `eval_` prefix: `loss`, "
        "`perplexity`, `exact_match` (causal_lm; exact_match with an exact_match block); "
        "`accuracy`, `f1_macro`, `f1_weighted`, `precision_macro`, "
        "`recall_macro` (sequence_classification); `f1`, `precision`, `recall`, `accuracy` "
        "(token_classification); `reward` (objective reinforcement). Default: `f1_macro` for "
        "classification, `f1` for NER, `loss` for causal_lm, `reward` for objective "
        "reinforcement. Loss and perplexity are better lower, the others higher.",
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None,
        description="Stop once `patience` evaluations in a row did not improve "
        "metric_for_best_model by more than `threshold`.",
    )
    suffix: str | None = Field(
        default=None,
        pattern=SUFFIX_PATTERN,
        description="Up to 64 lowercase letters, digits, '-' and '_', put into the registered "
        "model's name (ft:<base>:<suffix>:<job id>).",
    )
    merge_adapter: bool = Field(
        default=False,
        description="With lora/adalora: register the base with the adapter merged in.",
    )
    from_checkpoint: CheckpointRef | None = None
    tracking: list[Tracker] | None = Field(
        default=None,
        max_length=len(Tracker),
        description="Experiment trackers this job reports to ([] for none); default: the "
        "deployment's `MODELYARD_TRACKING` (off unless set).",
    )
    trust_remote_code: bool = Field(default=False, description="Always refused.")

    @field_validator("trust_remote_code")
    @classmethod
    def _refuse_remote_code(cls, value: bool) -> bool:
        if value:
            raise ValueError("trust_remote_code is not supported: only built-in architectures run")
        return value

    @field_validator("metric_for_best_model")
    @classmethod
    def _metric_the_task_reports(cls, metric: str | None, info: ValidationInfo) -> str | None:
        task = info.data.get("task")
        if metric is None or task is None:
            return metric
        name = metric if metric.startswith("eval_") else f"eval_{metric}"
        reported = EVAL_METRICS[task]
        what = f"{task.value} evaluations"
        if info.data.get("exact_match") is not None:
            reported, what = (*reported, EXACT_MATCH_METRIC), f"{what} with exact_match"
        if info.data.get("objective") is FineTuneObjective.REINFORCEMENT:
            reported, what = REINFORCEMENT_EVAL_METRICS, "reinforcement evaluations"
        if name not in reported:
            raise ValueError(
                f"{what} do not report {metric!r}; choose one of "
                f"{', '.join(m.removeprefix('eval_') for m in reported)}"
            )
        return name

    @property
    def best_model_metric(self) -> str:
        """The `eval_` metric that picks the kept checkpoint: the chosen one or the task's
        (for objective reinforcement, the grader's mean score)."""
        if self.metric_for_best_model is not None:
            return self.metric_for_best_model
        if self.objective is FineTuneObjective.REINFORCEMENT:
            return REINFORCEMENT_EVAL_METRICS[0]
        return DEFAULT_METRIC_FOR_BEST_MODEL[self.task]

    @property
    def greater_is_better(self) -> bool:
        return self.best_model_metric not in LOWER_IS_BETTER

    @model_validator(mode="after")
    def _task_defaults(self) -> Self:
        """Hyperparameters the request left out take the task's defaults. The API stores
        the spec with them filled in, so a job keeps what it ran with if defaults change."""
        given = self.hyperparameters.model_fields_set
        task_defaults = TASK_HYPERPARAMETER_DEFAULTS.get(self.task, {})
        missing = {name: value for name, value in task_defaults.items() if name not in given}
        if missing:
            self.hyperparameters = self.hyperparameters.model_copy(update=missing)
        return self

    @model_validator(mode="after")
    def _merge_needs_adapter(self) -> FineTuneSpec:
        if self.merge_adapter and self.method is FineTuneMethod.FULL:
            raise ValueError("merge_adapter needs method lora or adalora")
        return self

    @field_validator("objective")
    @classmethod
    def _dpo_trains_language_models(
        cls, objective: FineTuneObjective, info: ValidationInfo
    ) -> FineTuneObjective:
        task = info.data.get("task")
        if objective is not FineTuneObjective.SUPERVISED and task not in (
            None,
            FineTuneTask.CAUSAL_LM,
        ):
            raise ValueError(f"objective {objective.value} needs task causal_lm, not {task}")
        return objective

    @field_validator("exact_match")
    @classmethod
    def _exact_match_generates_text(
        cls, settings: ExactMatchSpec | None, info: ValidationInfo
    ) -> ExactMatchSpec | None:
        task, objective = info.data.get("task"), info.data.get("objective")
        if settings is None:
            return settings
        if task is not None and task is not FineTuneTask.CAUSAL_LM:
            raise ValueError(f"exact_match applies to task causal_lm only, not {task.value}")
        if objective is not None and objective is not FineTuneObjective.SUPERVISED:
            raise ValueError(
                f"exact_match applies to objective supervised only, not {objective.value}"
            )
        return settings

    @field_validator("reinforcement")
    @classmethod
    def _reinforcement_settings_need_reinforcement(
        cls, settings: ReinforcementSpec | None, info: ValidationInfo
    ) -> ReinforcementSpec | None:
        objective = info.data.get("objective")
        if settings is not None and objective is not FineTuneObjective.REINFORCEMENT:
            raise ValueError("reinforcement settings need objective reinforcement")
        return settings

    @model_validator(mode="after")
    def _reinforcement_has_a_grader(self) -> FineTuneSpec:
        if self.objective is not FineTuneObjective.REINFORCEMENT:
            return self
        if self.reinforcement is None:
            raise ValueError("objective reinforcement needs a reinforcement block with a grader")
        completion = self.reinforcement.max_completion_tokens
        if completion >= self.hyperparameters.max_length:
            raise ValueError(
                f"reinforcement.max_completion_tokens ({completion}) must be below "
                f"hyperparameters.max_length ({self.hyperparameters.max_length}): a prompt and "
                "its completion share it"
            )
        return self

    @property
    def reinforcement_settings(self) -> ReinforcementSpec:
        """The reinforcement settings (objective reinforcement has them)."""
        if self.reinforcement is None:
            raise ValueError(f"objective {self.objective.value} has no reinforcement settings")
        return self.reinforcement

    @field_validator("dpo")
    @classmethod
    def _dpo_settings_need_dpo(cls, dpo: DpoSpec | None, info: ValidationInfo) -> DpoSpec | None:
        if dpo is not None and info.data.get("objective") is not FineTuneObjective.DPO:
            raise ValueError("dpo settings need objective dpo")
        return dpo

    @property
    def dpo_settings(self) -> DpoSpec:
        """The DPO settings given, or their defaults."""
        return self.dpo or DpoSpec()

    @field_validator("hyperparameters")
    @classmethod
    def _lm_only_needs_causal_lm(cls, hp: Hyperparameters, info: ValidationInfo) -> Hyperparameters:
        task = info.data.get("task")
        for name in _SUPERVISED_LM_ONLY:
            if getattr(hp, name) and task is not None and task is not FineTuneTask.CAUSAL_LM:
                raise ValueError(f"{name} applies to task causal_lm only, not {task.value}")
        return hp

    @model_validator(mode="after")
    def _lm_only_is_supervised(self) -> FineTuneSpec:
        for name in _SUPERVISED_LM_ONLY:
            if getattr(self.hyperparameters, name) and (
                self.objective is not FineTuneObjective.SUPERVISED
            ):
                raise ValueError(
                    f"{name} applies to objective supervised only, not {self.objective.value}"
                )
        return self

    @field_validator("base_model")
    @classmethod
    def _base_no_parent_segments(cls, model: str) -> str:
        if ".." in model.split("/"):
            raise ValueError("base_model may not contain '..' segments")
        return model


MAX_RANK_CANDIDATES = 1000
LabelName = Annotated[str, StringConstraints(min_length=1, max_length=200)]


class PredictSpec(BaseModel):
    """Run a fine-tuned classifier or tagger over texts (or a dataset's texts); or, in
    `rank` mode, score candidate items against a query with a pair classifier."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(pattern=MODEL_REF_PATTERN)
    mode: PredictMode = PredictMode.PREDICT
    texts: list[Prompt] | None = Field(default=None, min_length=1, max_length=4096)
    dataset: DatasetId | None = None
    query: Prompt | None = Field(
        default=None, description="rank: the text each candidate is paired with (user interests)."
    )
    candidates: list[Prompt] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_RANK_CANDIDATES,
        description="rank: the item texts to score and sort.",
    )
    top_k: int | None = Field(
        default=None, ge=1, le=MAX_RANK_CANDIDATES, description="rank: keep the best k only."
    )
    label: LabelName | None = Field(
        default=None,
        description="rank: the label whose probability is the score; default `clicked`, "
        "else `1`, `positive`, `pos`, `yes` or `true`, whichever the model has.",
    )
    batch_size: int = Field(default=32, ge=1, le=512)
    max_length: int = Field(default=256, ge=8, le=4096)

    @model_validator(mode="after")
    def _one_source(self) -> PredictSpec:
        rank_fields = {
            "query": self.query,
            "candidates": self.candidates,
            "top_k": self.top_k,
            "label": self.label,
        }
        if self.mode is PredictMode.RANK:
            if self.texts is not None or self.dataset is not None:
                raise ValueError("rank mode takes query and candidates, not texts or dataset")
            if self.query is None or self.candidates is None:
                raise ValueError("rank mode needs a query and a list of candidates")
            return self
        given = sorted(name for name, value in rank_fields.items() if value is not None)
        if given:
            raise ValueError(f"{', '.join(given)} only apply to mode 'rank'")
        if (self.texts is None) == (self.dataset is None):
            raise ValueError("give exactly one of texts or dataset")
        return self


COMPLETION_WINDOW_PATTERN = r"^[1-9][0-9]{0,6}[smh]$"
MAX_COMPLETION_WINDOW = timedelta(days=7)
_WINDOW_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def completion_window(window: str) -> timedelta:
    """`24h`, `90m` or `5s` as a timedelta."""
    return timedelta(seconds=int(window[:-1]) * _WINDOW_UNIT_S[window[-1]])


class BatchSpec(BaseModel):
    """Run an uploaded file of OpenAI batch request lines (a batch_requests dataset)."""

    model_config = ConfigDict(extra="forbid")

    input_dataset: DatasetId
    endpoint: BatchEndpoint
    completion_window: str = Field(
        default="24h",
        pattern=COMPLETION_WINDOW_PATTERN,
        description="Time from creation until unfinished lines expire: 24h, 90m, 30s (<= 7 days).",
    )

    @field_validator("completion_window")
    @classmethod
    def _at_most_a_week(cls, window: str) -> str:
        if completion_window(window) > MAX_COMPLETION_WINDOW:
            raise ValueError("completion_window is at most 7 days (168h)")
        return window

    @property
    def window(self) -> timedelta:
        return completion_window(self.completion_window)


MAX_EMBED_INPUTS = 2048  # OpenAI's limit of inputs per embeddings request
MAX_EMBED_INPUT_CHARS = 100_000
MAX_EMBED_INPUT_TOKENS = 32_768  # the model's context is checked at submit and by the worker
MAX_TOKEN_ID = 2**31 - 1
TokenIds = list[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)]]


def _embed_inputs(value: Any) -> Any:
    """OpenAI's four shapes of `input` (a string, strings, token ids, lists of token ids)
    as a list of strings or a list of token-id lists; anything else is refused whole, with
    a message naming the first bad input, rather than with one error per union branch."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ValueError("give a string, a non-empty array of strings or of token ids")
    if all(type(v) is int for v in value):
        value = [value]
    if len(value) > MAX_EMBED_INPUTS:
        raise ValueError(f"at most {MAX_EMBED_INPUTS} inputs per request, not {len(value)}")
    texts = isinstance(value[0], str)
    for i, item in enumerate(value):
        if texts and isinstance(item, str):
            if not item:
                raise ValueError(f"input[{i}] is an empty string")
            if len(item) > MAX_EMBED_INPUT_CHARS:
                raise ValueError(f"input[{i}] is longer than {MAX_EMBED_INPUT_CHARS} characters")
        elif not texts and isinstance(item, list) and all(type(t) is int for t in item):
            if not item:
                raise ValueError(f"input[{i}] is an empty array of token ids")
            if len(item) > MAX_EMBED_INPUT_TOKENS:
                raise ValueError(f"input[{i}] has more than {MAX_EMBED_INPUT_TOKENS} tokens")
            if not all(0 <= t <= MAX_TOKEN_ID for t in item):
                raise ValueError(f"input[{i}] holds a token id outside 0..{MAX_TOKEN_ID}")
        else:
            raise ValueError(
                f"input[{i}] is not {'a string' if texts else 'an array of token ids'}: every "
                "input is a string, or every input is an array of integer token ids"
            )
    return value


class EmbedSpec(BaseModel):
    """Texts (or token ids) to embed with a sentence encoder: one vector per input, the
    mean of the last hidden state over the attention mask, L2-normalized."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        pattern=MODEL_REF_PATTERN,
        description="An encoder (loaded with AutoModel): a model directory name, a registered "
        "model or an allowed hub id, e.g. all-MiniLM-L6-v2.",
    )
    input: list[str] | list[TokenIds] = Field(
        description="A string, an array of strings, an array of token ids or an array of "
        f"arrays of token ids (fed as given, no special tokens added); at most "
        f"{MAX_EMBED_INPUTS} inputs, none empty, each within the model's context."
    )
    dimensions: int | None = Field(
        default=None,
        ge=1,
        le=65_536,
        description="Only the model's own width: these encoders are not trained to be cut.",
    )

    @field_validator("model")
    @classmethod
    def _no_parent_segments(cls, model: str) -> str:
        if ".." in model.split("/"):
            raise ValueError("model may not contain '..' segments")
        return model

    @field_validator("input", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        return _embed_inputs(value)

    @property
    def texts(self) -> list[str] | None:
        """The inputs when they are strings; None when they are token ids."""
        return [i for i in self.input if isinstance(i, str)] if self._of_texts else None

    @property
    def token_ids(self) -> list[list[int]] | None:
        """The inputs when they are token ids; None when they are strings."""
        return None if self._of_texts else [i for i in self.input if not isinstance(i, str)]

    @property
    def _of_texts(self) -> bool:
        return isinstance(self.input[0], str)


MAX_RUNTIME_S = 30 * 24 * 3600.0


class _JobRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    priority: int = Field(default=0, ge=0, le=9, description="0 (lowest) to 9 (highest).")
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    metadata: dict[MetadataKey, MetadataValue] = Field(default_factory=dict, max_length=32)
    expires_at: AwareDatetime | None = Field(
        default=None,
        description="A job still queued at this time ends `expired` and never starts.",
    )
    max_runtime_s: float | None = Field(
        default=None,
        gt=0,
        le=MAX_RUNTIME_S,
        description="Run time limit of each attempt (the workers' job_time_limit_s applies "
        "too): at the limit the job checkpoints and fails with `timed_out`.",
    )

    webhook_url: str | None = Field(
        default=None,
        min_length=1,
        max_length=2048,
        description="Where signed webhook deliveries about this job are POSTed (http/https, "
        "public addresses only unless allowed in settings).",
    )
    webhook_events: list[WebhookEvent] | None = Field(
        default=None,
        min_length=1,
        description="The events sent to webhook_url; default started, checkpoint, completed "
        "(progress is throttled and opt-in).",
    )

    @model_validator(mode="after")
    def _events_need_url(self) -> Self:
        if self.webhook_events is not None and self.webhook_url is None:
            raise ValueError("webhook_events needs a webhook_url")
        if self.webhook_events is not None and WebhookEvent.ALERT in self.webhook_events:
            raise ValueError("alert is a monitor event; jobs cannot subscribe to it")
        return self

    @field_validator("expires_at")
    @classmethod
    def _expires_in_future(cls, value: datetime | None) -> datetime | None:
        if value is not None and value <= datetime.now(UTC):
            raise ValueError("expires_at is in the past")
        return value


DEFAULT_WEBHOOK_EVENTS = (WebhookEvent.STARTED, WebhookEvent.CHECKPOINT, WebhookEvent.COMPLETED)


class GenerateJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a generation job."""

    kind: Literal[JobKind.GENERATE]
    spec: GenerateSpec


class FineTuneJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a fine-tuning job."""

    kind: Literal[JobKind.FINETUNE]
    spec: FineTuneSpec


class PredictJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a prediction job."""

    kind: Literal[JobKind.PREDICT]
    spec: PredictSpec


class NoopJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a no-op job."""

    kind: Literal[JobKind.NOOP]
    spec: NoopSpec = Field(default_factory=NoopSpec)


class BatchJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for a batch of OpenAI-format request lines."""

    kind: Literal[JobKind.BATCH]
    spec: BatchSpec


class EmbedJobRequest(_JobRequestBase):
    """Body of `POST /v1/jobs` for an embedding job (what `POST /v1/embeddings` creates)."""

    kind: Literal[JobKind.EMBED]
    spec: EmbedSpec


AnyJobRequest = (
    GenerateJobRequest
    | FineTuneJobRequest
    | PredictJobRequest
    | NoopJobRequest
    | BatchJobRequest
    | EmbedJobRequest
)
JobRequest = Annotated[AnyJobRequest, Field(discriminator="kind")]

SPEC_FOR_KIND: dict[JobKind, type[BaseModel]] = {
    JobKind.GENERATE: GenerateSpec,
    JobKind.FINETUNE: FineTuneSpec,
    JobKind.PREDICT: PredictSpec,
    JobKind.NOOP: NoopSpec,
    JobKind.BATCH: BatchSpec,
    JobKind.EMBED: EmbedSpec,
}


def parse_spec(kind: JobKind, spec: dict[str, Any]) -> BaseModel:
    """Rebuild a stored spec for a worker."""
    return SPEC_FOR_KIND[kind].model_validate(spec)
