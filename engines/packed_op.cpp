// imgsearch::packed_linear: oneDNN's product on a weight packed once at load (engines/packed.py), in C++ so that
// the compiled rerank (engines/compiled.py) calls it without taking Python's GIL. Its Python twin,
// imgsearch::linear, serves the eager passes; this one the AOTInductor package, whose C++ would otherwise wait
// for the GIL at each of its 96 products whenever another thread of the worker runs Python.
//
// imgsearch::remember(weight, packed) files a packed form under its weight's address; packed_linear finds it for
// that very tensor (same address, sizes, strides and dtype, its storage still alive) and runs
// mkldnn::_linear_pointwise on it, else the plain product. imgsearch::forget(address) drops an entry.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

namespace {

struct Entry {
  c10::weak_intrusive_ptr<c10::StorageImpl> storage;
  std::vector<int64_t> sizes, strides;
  at::ScalarType dtype;
  at::Tensor packed;
};

std::mutex mu;
std::unordered_map<int64_t, Entry> table;

int64_t address(const at::Tensor& t) { return reinterpret_cast<int64_t>(t.data_ptr()); }

at::Tensor packed_for(const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(mu);
  auto it = table.find(address(weight));
  if (it == table.end()) return {};
  const Entry& e = it->second;
  if (e.storage.expired() || e.dtype != weight.scalar_type() || e.sizes != weight.sizes().vec() ||
      e.strides != weight.strides().vec()) {
    return {};
  }
  return e.packed;
}

void remember(const at::Tensor& weight, const at::Tensor& packed) {
  std::lock_guard<std::mutex> lock(mu);
  table.insert_or_assign(address(weight), Entry{weight.storage().getWeakStorageImpl(), weight.sizes().vec(),
                                                weight.strides().vec(), weight.scalar_type(), packed});
}

void forget(int64_t at) {
  std::lock_guard<std::mutex> lock(mu);
  table.erase(at);
}

at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                         bool gelu) {
  at::Tensor packed = x.scalar_type() == at::kBFloat16 && x.device().is_cpu() ? packed_for(weight) : at::Tensor();
  if (!packed.defined()) {
    at::Tensor out = at::linear(x, weight, bias);
    return gelu ? at::gelu(out) : out;
  }
  static const c10::OperatorHandle op = c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  torch::jit::Stack stack;
  stack.emplace_back(x);
  stack.emplace_back(packed);
  stack.emplace_back(bias);
  stack.emplace_back(std::string(gelu ? "gelu" : "none"));
  stack.emplace_back(c10::List<std::optional<at::Scalar>>());
  stack.emplace_back(std::string(gelu ? "none" : ""));
  op.callBoxed(&stack);
  return stack.back().toTensor();
}

}  // namespace

TORCH_LIBRARY(imgsearch_native, m) {
  m.def("packed_linear(Tensor x, Tensor weight, Tensor? bias, bool gelu) -> Tensor");
  m.def("remember(Tensor weight, Tensor packed) -> ()", &remember);
  m.def("forget(int address) -> ()", &forget);
}

TORCH_LIBRARY_IMPL(imgsearch_native, CPU, m) {
  m.impl("packed_linear", &packed_linear);
}
