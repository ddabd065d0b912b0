"""mlm: pretrain BERT- and RoBERTa-family masked language models and evaluate them on GLUE."""

__version__ = "0.1.0"
