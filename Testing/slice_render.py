"""What the user sees: a Slicer slice view rendered offscreen with Slicer's own displayable managers.

`slicer-core` (Slicer's MRML and logic without Qt) renders a slice view through EGL (Mesa's
llvmpipe here): the slice logic's image (background and foreground volumes, as Slicer blends
them) plus the segmentation and markups displayable managers. Used by the tests on the preview
scene the module builds, and by tools/render_screenshots.py for the pictures in docs/.
"""
import os

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")

import numpy as np  # noqa: E402
import slicer  # noqa: E402
import vtk  # noqa: E402
from vtk.util import numpy_support  # noqa: E402


class SliceRender:
    """An axial ("Red") slice view of `scene`, size x size pixels."""

    def __init__(self, scene, size: int = 300):
        self.size = size
        self.app = slicer.vtkMRMLApplicationLogic()
        self.app.SetMRMLScene(scene)
        # The Colors and Markups logics on the application logic: no lookup tables / no points otherwise.
        self.colors = slicer.vtkSlicerColorLogic()
        self.colors.SetMRMLScene(scene)
        self.app.SetModuleLogic("Colors", self.colors)
        self.markups = slicer.vtkSlicerMarkupsLogic()
        self.markups.SetMRMLScene(scene)
        self.app.SetModuleLogic("Markups", self.markups)
        self.renderer = vtk.vtkRenderer()
        self.renderer.GetActiveCamera().ParallelProjectionOn()
        self.window = vtk.vtkRenderWindow()
        self.window.SetOffScreenRendering(1)
        self.window.SetSize(size, size)
        self.window.AddRenderer(self.renderer)
        # An initialised interactor before the displayable managers see a view node (segfault otherwise).
        self.interactor = vtk.vtkRenderWindowInteractor()
        self.interactor.SetRenderWindow(self.window)
        self.interactor.Initialize()
        self.logic = slicer.vtkMRMLSliceLogic()
        self.logic.SetMRMLApplicationLogic(self.app)
        self.logic.SetMRMLScene(scene)
        # Slicer's orientation presets (the application adds them at start): axial with the patient's
        # right on the screen's left, as in Slicer's Red view (without them the view is a "Reformat").
        slicer.vtkMRMLSliceNode.AddDefaultSliceOrientationPresets(scene)
        self.slice_node = self.logic.AddSliceNode("Red")
        self.slice_node.SetOrientation("Axial")
        if self.app.GetSliceLogics() is None:
            self.app.SetSliceLogics(vtk.vtkCollection())
        self.app.GetSliceLogics().AddItem(self.logic)
        # The slice image actor before the displayable managers (segments look opaque otherwise).
        self.mapper = vtk.vtkImageMapper()
        self.mapper.SetColorWindow(255)
        self.mapper.SetColorLevel(127.5)
        actor = vtk.vtkActor2D()
        actor.SetMapper(self.mapper)
        actor.GetProperty().SetDisplayLocationToBackground()
        self.renderer.AddViewProp(actor)
        self.group = slicer.vtkMRMLDisplayableManagerGroup()
        self.group.SetRenderer(self.renderer)
        factory = slicer.vtkMRMLSliceViewDisplayableManagerFactory.GetInstance()
        factory.SetMRMLApplicationLogic(self.app)
        for name in ("vtkMRMLSegmentationsDisplayableManager2D", "vtkMRMLMarkupsDisplayableManager"):
            if not factory.IsDisplayableManagerRegistered(name):
                factory.RegisterDisplayableManager(name)
        self.group.Initialize(factory, self.renderer)
        self.group.SetMRMLDisplayableNode(self.slice_node)

    def show(self, background, foreground=None, opacity: float = 0.5) -> None:
        composite = self.logic.GetSliceCompositeNode()
        composite.SetBackgroundVolumeID(background.GetID())
        composite.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        composite.SetForegroundOpacity(opacity)
        self.logic.ResizeSliceNode(self.size, self.size)
        self.logic.FitSliceToBackground()
        self.mapper.SetInputConnection(self.logic.GetImageDataConnection())

    def render(self, ras_z: float) -> np.ndarray:
        """(size, size, 3) uint8 screenshot of the slice at RAS height ras_z, row 0 at the top."""
        self.logic.SetSliceOffset(float(ras_z))
        self.window.Render()
        grab = vtk.vtkWindowToImageFilter()
        grab.SetInput(self.window)
        grab.ReadFrontBufferOff()
        grab.Update()
        image = grab.GetOutput()
        w, h, _ = image.GetDimensions()
        pixels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(h, w, -1)
        return np.ascontiguousarray(pixels[::-1, :, :3])

    def pixel_of(self, ras) -> tuple:
        """(row, column) of the screenshot where RAS point `ras` is drawn."""
        m = self.slice_node.GetXYToRAS()
        xy_to_ras = np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])
        x, y = (np.linalg.inv(xy_to_ras) @ np.r_[np.asarray(ras, float), 1.0])[:2]
        return self.size - 1 - int(round(y)), int(round(x))
