"""Pre-processing of xGen-MM inputs, in the order of the data flow:

    anyres.py      any-res planning and tiling (pure functions, shared with the model)
    image.py       loading untrusted images, `Blip3ImageProcessor`
    tokenizer.py   the xGen-MM special tokens, small offline tokenizers
    chat.py        the chat template and its label mask
    processor.py   `Blip3Processor`: all of the above -> model inputs

The public classes are re-exported by `blip3`, which also registers them with transformers' Auto classes.
"""
