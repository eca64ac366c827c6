"""`synpo web`: SynPo in a browser page, on Slicer's own MRML (trame-slicer).

A Slicer-side client, like the Slicer module: it builds the same scene with the same code
(SynPoSlicerLib: mrml.py for the preview nodes, apply.py for Apply, logic.py for the workflow,
engine.py for the runs on a `synpo serve` server). The engine (`synpo`) never imports this
package; it needs slicer-core, trame and trame-slicer (the `web` extra).
"""
