"""What both packages use: the one error type users see, YAML configs with line numbers, durable
file writes, the token-id helpers every generation path shares, and one log filter.

    errors      InputError: bad input as one line naming the file, row or key (the CLI exits 2)
    yamlconfig  load_yaml_model (errors name the key and its line), resolve_path (relative to the YAML)
    files       fsync_dir: a rename made durable
    sequences   left_padded, eos_token_ids, cut_at_eos: generation batches in, responses out

``ampo_cache`` (produces and serves traces) and ``ampo_train`` (consumes them) import this
package; it imports neither.
"""

import logging

# DeepSpeed is imported by Accelerate's and transformers' model helpers whenever it is installed
# (ampo-train, and ampo-cache's generation and tiny world too; both packages import this one
# first), and on a machine without a GPU it then warns, on every run, that it "was unable to
# detect" an accelerator. Running on the CPU there is intended: drop that one message (DeepSpeed's
# logger keeps this filter when it configures itself at import).
logging.getLogger("DeepSpeed").addFilter(lambda record: "we were unable to detect it" not in record.getMessage())
