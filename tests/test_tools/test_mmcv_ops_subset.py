"""``tools/mmcv_ops_subset.py``: the binding and CUDA-registration sources it cuts from
mmcv's files (here from short stand-ins written like mmcv 2.1.0's; the sdist itself is
only on the GPU machine)."""

import importlib
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location(
    'mmcv_ops_subset', ROOT / 'tools' / 'mmcv_ops_subset.py'
)
subset = importlib.util.module_from_spec(spec)
spec.loader.exec_module(subset)

PYBIND = """#include <torch/extension.h>

#include "pytorch_cpp_helper.hpp"

std::string get_compiler_version();
std::string get_compiling_cuda_version();

Tensor nms(Tensor boxes, Tensor scores, float iou_threshold, int offset);

Tensor softnms(Tensor boxes, Tensor scores, Tensor dets, float iou_threshold,
               float sigma, float min_score, int method, int offset);

std::vector<std::vector<int>> nms_match(Tensor dets, float iou_threshold);

void nms_rotated(Tensor dets, Tensor scores);

void sigmoid_focal_loss_forward(Tensor input, Tensor target, Tensor weight,
                                Tensor output, float gamma, float alpha);
void sigmoid_focal_loss_backward(Tensor input, Tensor target, Tensor weight,
                                 Tensor grad_input, float gamma, float alpha);
void softmax_focal_loss_forward(Tensor input, Tensor target, Tensor weight,
                                Tensor output, float gamma, float alpha);
void softmax_focal_loss_backward(Tensor input, Tensor target, Tensor weight,
                                 Tensor buff, Tensor grad_input, float gamma,
                                 float alpha);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("get_compiler_version", &get_compiler_version, "get_compiler_version");
  m.def("get_compiling_cuda_version", &get_compiling_cuda_version,
        "get_compiling_cuda_version");
  m.def("nms_rotated", &nms_rotated, "NMS for rotated boxes", py::arg("dets"),
        py::arg("scores"));
  m.def("nms", &nms, "nms (CPU/CUDA) ", py::arg("boxes"), py::arg("scores"),
        py::arg("iou_threshold"), py::arg("offset"));
  m.def("softnms", &softnms, "softnms (CPU) ", py::arg("boxes"),
        py::arg("scores"), py::arg("dets"), py::arg("iou_threshold"),
        py::arg("sigma"), py::arg("min_score"), py::arg("method"),
        py::arg("offset"));
  m.def("nms_match", &nms_match, "nms_match (CPU) ", py::arg("dets"),
        py::arg("iou_threshold"));
  m.def("sigmoid_focal_loss_forward", &sigmoid_focal_loss_forward,
        "sigmoid_focal_loss_forward ", py::arg("input"), py::arg("target"),
        py::arg("weight"), py::arg("output"), py::arg("gamma"),
        py::arg("alpha"));
  m.def("sigmoid_focal_loss_backward", &sigmoid_focal_loss_backward,
        "sigmoid_focal_loss_backward", py::arg("input"), py::arg("target"),
        py::arg("weight"), py::arg("grad_input"), py::arg("gamma"),
        py::arg("alpha"));
  m.def("softmax_focal_loss_forward", &softmax_focal_loss_forward,
        "softmax_focal_loss_forward", py::arg("input"), py::arg("target"),
        py::arg("weight"), py::arg("output"), py::arg("gamma"),
        py::arg("alpha"));
  m.def("softmax_focal_loss_backward", &softmax_focal_loss_backward,
        "softmax_focal_loss_backward", py::arg("input"), py::arg("target"),
        py::arg("weight"), py::arg("buff"), py::arg("grad_input"),
        py::arg("gamma"), py::arg("alpha"));
}
"""

CUDABIND = """#include "pytorch_cpp_helper.hpp"
#include "pytorch_device_registry.hpp"

void IoU3DNMS3DForwardCUDAKernelLauncher(const Tensor boxes, Tensor &keep,
                                         Tensor &keep_num,
                                         float nms_overlap_thresh);

void iou3d_nms3d_forward_impl(const Tensor boxes, Tensor &keep,
                              Tensor &keep_num, float nms_overlap_thresh);
REGISTER_DEVICE_IMPL(iou3d_nms3d_forward_impl, CUDA, iou3d_nms3d_forward_cuda);

void SigmoidFocalLossForwardCUDAKernelLauncher(Tensor input, Tensor target,
                                               Tensor weight, Tensor output,
                                               const float gamma,
                                               const float alpha);

void sigmoid_focal_loss_forward_impl(Tensor input, Tensor target, Tensor weight,
                                     Tensor output, float gamma, float alpha);

REGISTER_DEVICE_IMPL(sigmoid_focal_loss_forward_impl, CUDA,
                     sigmoid_focal_loss_forward_cuda);

Tensor NMSCUDAKernelLauncher(Tensor boxes, Tensor scores, float iou_threshold,
                             int offset);

Tensor nms_cuda(Tensor boxes, Tensor scores, float iou_threshold, int offset) {
  return NMSCUDAKernelLauncher(boxes, scores, iou_threshold, offset);
}

Tensor nms_impl(Tensor boxes, Tensor scores, float iou_threshold, int offset);
REGISTER_DEVICE_IMPL(nms_impl, CUDA, nms_cuda);

Tensor nms_rotated_cuda(const Tensor dets, const Tensor scores);
REGISTER_DEVICE_IMPL(nms_rotated_impl, CUDA, nms_rotated_cuda);
"""


def test_binding_declares_and_binds_the_built_functions_only():
    text = subset.binding_source(PYBIND)
    assert text.startswith('#include <torch/extension.h>\n#include "pytorch_cpp_helper.hpp"')
    for name in subset.FUNCTIONS:
        assert f'm.def("{name}", &{name},' in text
        assert f' {name}(' in text.split('PYBIND11_MODULE')[0]  # declared before the module
    assert 'nms_rotated' not in text  # a neighbour whose name starts the same
    # mmcv's argument names, which mmcv's Python side passes as keywords
    assert 'py::arg("iou_threshold"), py::arg("offset"));' in text
    assert text.count('m.def(') == len(subset.FUNCTIONS)


def test_binding_of_a_missing_function_stops_with_its_name():
    without = PYBIND.replace('m.def("softnms"', 'm.def("softnms_gone"')
    with pytest.raises(SystemExit, match='softnms: not found in pybind.cpp'):
        subset.binding_source(without)


def test_cudabind_keeps_the_focal_and_nms_registrations_only():
    text = subset.cudabind_source(CUDABIND)
    assert text.startswith(
        '#include "pytorch_cpp_helper.hpp"\n#include "pytorch_device_registry.hpp"'
    )
    for line in (
        'REGISTER_DEVICE_IMPL(sigmoid_focal_loss_forward_impl, CUDA,',
        'REGISTER_DEVICE_IMPL(nms_impl, CUDA, nms_cuda);',
        'Tensor NMSCUDAKernelLauncher(Tensor boxes, Tensor scores, float iou_threshold,',
        'void SigmoidFocalLossForwardCUDAKernelLauncher(Tensor input, Tensor target,',
    ):
        assert line in text
    assert 'iou3d' not in text and 'IoU3D' not in text and 'nms_rotated' not in text


def test_version_queries_are_answered_without_info_cpp():
    """mmcv's version queries come from the stub, not from ``info.cpp`` (whose build crashed
    its callers on an H200); nothing binds or compiles them."""
    assert 'info.cpp' not in subset.SOURCES
    assert not {'get_compiler_version', 'get_compiling_cuda_version'} & set(subset.FUNCTIONS)
    nvcc = 'nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.48\n'
    assert subset.cuda_version(nvcc) == '13.0'
    assert subset.cuda_version('') == 'not available'
    version = subset.compiler_version()
    assert version == 'unknown' or re.fullmatch(r'GCC \d+\.\d+', version), version


def test_stub_serves_built_ops_versions_and_names_the_missing(tmp_path, monkeypatch):
    """The generated ``mmcv._ext``, imported as mmcv imports it, with a stand-in for the
    built module: its ops pass through, the versions are the build's, and any other op
    raises naming itself and what was built."""
    package = tmp_path / 'fake_mmcv'
    package.mkdir()
    (package / '__init__.py').write_text('')
    (package / '_ext_subset.py').write_text('def nms(*args):\n    return "built nms"\n')
    (package / '_ext.py').write_text(subset.stub_source(['nms'], 'GCC 12.3', '13.0'))
    monkeypatch.syspath_prepend(str(tmp_path))
    ext = importlib.import_module('fake_mmcv._ext')
    assert ext.nms() == 'built nms'
    assert ext.get_compiler_version() == 'GCC 12.3'
    assert ext.get_compiling_cuda_version() == '13.0'
    assert ext.BUILT == ['nms']
    with pytest.raises(NotImplementedError, match="'roi_align' is not built here.*\\['nms'\\]"):
        ext.roi_align(1, 2)
