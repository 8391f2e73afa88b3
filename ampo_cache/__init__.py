import logging

# DeepSpeed is imported by Accelerate's and transformers' model helpers whenever it is installed
# (ampo-train, and ampo-cache's generation and tiny world too; ampo_train imports this package first),
# and on a machine without a GPU it then warns, on every run, that it "was unable to detect" an
# accelerator. Running on the CPU there is intended: drop that one message (DeepSpeed's logger
# keeps this filter when it configures itself at import).
logging.getLogger("DeepSpeed").addFilter(lambda record: "we were unable to detect it" not in record.getMessage())
