"""The columns of the store's two tables. docs/store.md documents them for readers without our code."""

import pyarrow as pa

TIMESTAMP = pa.timestamp("us", tz="UTC")

PROMPTS = pa.schema(
    [
        ("prompt_id", pa.string()),  # ids.prompt_id(problem)
        ("problem", pa.string()),  # the problem text as first seen
        ("answer", pa.string()),  # ground truth, as text
        ("source", pa.string()),  # where the prompt came from (file name, dataset)
        ("created_at", TIMESTAMP),
    ]
)

TRACES = pa.schema(
    [
        ("prompt_id", pa.string()),
        ("teacher", pa.string()),
        ("sample_idx", pa.int32()),  # 0.. per (prompt_id, teacher); with those two, the key
        ("text", pa.string()),  # the assistant's text only
        ("text_hash", pa.string()),  # ids.text_hash(text)
        ("extracted_answer", pa.string()),  # what the verifier read as the final answer
        ("correct", pa.bool_()),
        ("verify_status", pa.string()),  # correct|wrong|no_answer|timeout|error|trusted
        ("source_label", pa.bool_()),  # the source's own correctness label, when imported with one
        ("num_chars", pa.int32()),
        ("num_tokens", pa.int32()),  # generated tokens (null for imported traces)
        ("finish_reason", pa.string()),  # stop|length (null for imported traces)
        ("gen_params", pa.string()),  # JSON of the sampling parameters (null for imported traces)
        ("origin", pa.string()),  # "build:<teachers.yaml>" or "import:<file name>"
        ("created_at", TIMESTAMP),
    ]
)

TABLES = {"prompts": PROMPTS, "traces": TRACES}
