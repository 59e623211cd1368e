"""The Hugging Face modeling files that ``ratplus-convert --to hf`` copies next to the weights.

They import only torch and transformers (never megatron or megatron_ratplus), so an exported
directory runs anywhere ``transformers`` does; tests import them from here.
"""
