"""Method ``msvt`` (Fed-MSVT): a multi-scale vision transformer trained on synthetic defects."""
