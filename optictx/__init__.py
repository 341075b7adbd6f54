"""optictx: context optical compression (DeepSeek-OCR) and thinking with visual primitives, in PyTorch."""

__version__ = "0.1.0"


def __getattr__(name):  # lazy, so `import optictx` stays cheap
    if name == "OCR":
        from optictx.ocr import OCR
        return OCR
    raise AttributeError(name)
