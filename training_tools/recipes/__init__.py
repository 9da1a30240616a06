"""End-to-end training recipes (each a module runnable with ``python -m``).

``emoji_default``: the built-in default model ``snapgen-emoji``: emoji-world dataset -> autoencoder
-> teacher -> multi-level distillation into the student (+ the no-distillation ablation) ->
adversarial step distillation to 4 steps -> int8 export -> EmojiEval -> model card.
"""
