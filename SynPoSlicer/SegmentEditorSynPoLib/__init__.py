"""The SynPo Segment Editor effect (registered by the SynPo module at Slicer's start)."""
