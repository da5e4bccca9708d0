"""The privacy–utility audit: re-identification, fidelity, utility and memorisation of synthetic
images against their sources, and the report files.

May import `synthgen.output`, `synthgen.preview`, `synthgen.cohort` and the layers below them.
`synthgen.audit.engine.run_audit` is the entry point.
"""
