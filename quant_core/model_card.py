"""The model card (README.md) written into every exported checkpoint.

A checkpoint that leaves the service travels without its job: whoever loads it later needs to know
what it is (base model, bits, group, method, loss and options), how good it is (perplexity before and
after, on which text), how it was made (calibration data, seed, software versions) and how to load
it. The card uses the Hugging Face model-card layout: YAML front matter that the Hub indexes
(``base_model``, ``tags``, ``quantization``), then a readable body.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quant_core.eval_windows import per_unit
from quant_core.options import Options

if TYPE_CHECKING:
    from quant_core.report import Export, JobReport, PairedScores

CARD_NAME = "README.md"
FORMAT_TITLES = {
    "fake_quant": "fake-quantized (dequantized weights on the quantization grid, stored as floats)",
    "pack_quantized": "pack-quantized (integer codes packed in int32 with scales and zero points: compressed-tensors)",
    "gguf": "GGUF for llama.cpp (integer codes in llama.cpp's blocks of 32 with float16 scales)",
}


def _yaml_value(value: Any) -> str:
    """A scalar as YAML: JSON's quoting is valid YAML for strings, numbers, booleans and null."""
    return json.dumps(value)


def _front_matter(report: JobReport, export_format: str) -> str:
    spec, quant = report.spec, report.spec.quant
    tags = ["swquant", "quantized", f"w{quant.bits}", spec.method, str(spec.loss), export_format]
    quantization = {
        "method": spec.method,
        "loss": spec.loss,
        "bits": quant.bits,
        "group_size": quant.group_size,
        "symmetric": quant.symmetric,
        "format": export_format,
    }
    lines = ["---", f"base_model: {_yaml_value(spec.model)}", "library_name: transformers", "tags:"]
    lines += [f"  - {_yaml_value(tag)}" for tag in dict.fromkeys(tags)]
    lines += ["quantization:"] + [f"  {key}: {_yaml_value(value)}" for key, value in quantization.items()]
    return "\n".join([*lines, "---"])


def _options(options: Options) -> str:
    """The options the job set (the rest are the defaults of this version)."""
    given = options.model_dump(mode="json", exclude_unset=True)
    return ", ".join(f"`{k}: {json.dumps(v)}`" for k, v in given.items()) or "defaults"


def _loading(export_format: str, export: Export) -> str:
    load = (
        "```python\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")\n'
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")\n'
        "```\n"
    )
    if export_format == "gguf":
        name = export.details.get("file", "model.gguf")
        return (
            f"llama.cpp runs it as it is ({export.details.get('block_type')} blocks): `llama-server -m {name}` "
            f"serves it over an OpenAI-style HTTP API, `llama-cli -m {name}` chats, and from Python "
            f'`llama_cpp.Llama(model_path="{name}")` (llama-cpp-python).\n'
        )
    if export_format == "fake_quant":
        return (
            "The weights are ordinary floating-point tensors whose values lie on the quantization grid, so "
            "any tool that loads the base model loads this one; it is as large as the base model and "
            "runs at its speed (use the pack-quantized export to save memory).\n\n" + load
        )
    blockers = export.vllm_blockers
    vllm = (
        "vLLM cannot serve it: " + "; ".join(blockers) + "."
        if blockers
        else 'vLLM serves it directly: `vllm serve path/to/this/folder` (or `LLM("path/to/this/folder")`).'
    )
    return (
        f"transformers decompresses it on load when `compressed-tensors` "
        f"(written with {export.details.get('compressed_tensors', 'an unknown version')}) is installed:\n\n"
        f"{load}\n{vllm}\n"
    )


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _accuracy_table(lm_eval: PairedScores) -> str:
    """lm-evaluation-harness scores beside the base model's, when the job ran any."""
    if not lm_eval:
        return ""
    rows = [
        f"| {task} | {metric} | {_number(pair['before'])} | {_number(pair['after'])} |"
        for task, metrics in lm_eval.items()
        for metric, pair in metrics.items()
    ]
    header = "\nlm-evaluation-harness:\n\n| task | metric | base model | this model |\n| --- | --- | --- | --- |\n"
    return header + "\n".join(rows) + "\n"


def _word_perplexity(token_perplexity: float, counts: dict[str, int]) -> str:
    return f"{per_unit(token_perplexity, counts)['word_perplexity']:.2f}"


def model_card(report: JobReport, export_format: str) -> str:
    """The card of the ``export_format`` export described by the job ``report``."""
    spec = report.spec
    quant, calib = spec.quant, spec.calibration
    rows = "\n".join(
        f"| {text} | {ppl.before:.2f} | {ppl.after:.2f} | {_word_perplexity(ppl.before, report.eval_counts[text])} | "
        f"{_word_perplexity(ppl.after, report.eval_counts[text])} | {report.eval_counts[text]['windows']} |"
        for text, ppl in report.perplexity.items()
    )
    start = report.eval_protocol["start_token"]
    bos = f"`{start}` at the start of {report.eval_protocol['start']}" if start else "no start token"
    versions = ", ".join(f"{name} {version}" for name, version in report.versions.items())
    group = f"group {quant.group_size}" if quant.group_size else "per channel"
    return f"""{_front_matter(report, export_format)}

# {Path(spec.model).name or spec.model}: {quant.label}, {spec.method} + {spec.loss}

A {quant.bits}-bit ({group}, {"symmetric" if quant.symmetric else "asymmetric"}) quantization of
`{spec.model}`, {FORMAT_TITLES[export_format]}, made by SWQuant {report.versions.get("swquant", "")}.

## How it was made

| setting | value |
| --- | --- |
| method | `{spec.method}` with {_options(spec.method_options)} |
| loss | `{spec.loss}` with {_options(spec.loss_options)} |
| end-to-end tuning | {_options(spec.finetune) if spec.finetune.enabled else "none"} |
| calibration | `{calib.text}`: {calib.n_samples} windows of {calib.seq_len} tokens \
({report.calibration_tokens} tokens), seed {spec.seed} |
| calibration time | {report.seconds.calibration / 60:.1f} min on `{spec.device}` |
| software | {versions} |

## Quality

Perplexity of the base model and of this one on the same windows of {report.eval_seq_len} tokens
({bos}; each token of the text scored once; word perplexity as lm-evaluation-harness's `wikitext`):

| text | base model | this model | base model, per word | this model, per word | windows |
| --- | --- | --- | --- | --- | --- |
{rows}
{_accuracy_table(report.lm_eval)}
{_runtime_table(report)}
## How to load it

{_loading(export_format, report.exports[export_format])}"""


def _runtime_table(report: JobReport) -> str:
    """The job's target runtimes and what each scored, or why it did not run."""
    if not report.runtimes:
        return ""
    rows = []
    for runtime, score in report.runtimes.items():
        if not score.ran or score.perplexity is None or score.relative_difference is None:
            rows.append(f"| {runtime} | `{score.checkpoint}` | not run: {score.reason} | |")
            continue
        for text, value in score.perplexity.items():
            difference = f"{score.relative_difference[text]:+.2%}"
            rows.append(
                f"| {runtime} ({score.runtime}) | `{score.checkpoint}` | {value:.2f} on {text} | {difference} |"
            )
    return (
        "\nEach target runtime loaded its checkpoint and scored the same windows:\n\n"
        "| runtime | checkpoint | perplexity | vs this report |\n| --- | --- | --- | --- |\n" + "\n".join(rows) + "\n"
    )


def write_model_cards(out_dir: Path, report: JobReport) -> None:
    """A README.md in every export folder the report lists (paths relative to ``out_dir``)."""
    for export_format, export in report.exports.items():
        (out_dir / export.path / CARD_NAME).write_text(model_card(report, export_format), encoding="utf-8")
