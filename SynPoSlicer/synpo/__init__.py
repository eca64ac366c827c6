"""SynPo: training-free few-shot segmentation of a volume from one labelled slice."""
__version__ = "0.1.0"
