"""Datasets: synthetic motion clips for tests and reports, and UCF101-style frame folders."""

from .folder import VideoFolder
from .synthetic import SyntheticMotionVideos, class_motions, render_clip

__all__ = ["SyntheticMotionVideos", "VideoFolder", "class_motions", "render_clip"]
