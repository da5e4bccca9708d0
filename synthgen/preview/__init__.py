"""Drawing only: captioned contact sheets and asked-vs-drawn label plots.

May import `synthgen.output` (to sample committed images) and the layers below it; never renders.
"""
