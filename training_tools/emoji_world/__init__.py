"""The emoji world: a small synthetic text-to-image domain rendered from Noto Color Emoji.

Modules: ``curation`` (which emoji become classes), ``render`` (glyphs, palette, crops),
``compose`` (scenes, layouts, captions, structured specs), ``dataset_builder`` (PNG + metadata.jsonl
datasets), ``finder`` (background + connected-component object finder), ``classifier`` (a small
convnet trained on real renders) and ``eval`` (EmojiEval: per-category accuracy + Frechet distance).
CLI: ``python -m training_tools.emoji_world build ...``, ``python -m training_tools.emoji_world.classifier
train ...``, ``python -m training_tools.emoji_world.eval ...``.
"""
