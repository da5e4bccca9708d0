"""OUT: its layout names, typed records, the manifest, the shard writer and the one shard reader,
the dataset card's text, the label summary and the Hub push.

May import `synthgen.plan`, `synthgen.recipe`, `synthgen.hashing` and `synthgen.errors`; knows
nothing of models or rendering (the worker joins the two).
"""
