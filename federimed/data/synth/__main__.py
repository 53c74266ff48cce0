"""``python -m federimed.data.synth``: the style examples of docs/data.md."""

from federimed.data.synth.length import style_examples

for style, text in style_examples().items():
    print(f"{style}:\n\n    {text}\n")
