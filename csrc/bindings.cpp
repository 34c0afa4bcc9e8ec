// fastrft._engine: Python bindings of the block manager and the scheduler. Their pure-Python twins in
// fastrft/engine/{block_manager,scheduler}.py document the API; arrays cross as numpy int32/int64.
// std::invalid_argument surfaces as ValueError, std::runtime_error as RuntimeError.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>

#include "block_manager.h"
#include "sampler.h"
#include "scheduler.h"

namespace py = pybind11;
using fastrft::BlockManager;
using fastrft::Scheduler;
using fastrft::ScheduleOutput;
using Ids = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;  // any int sequence -> int64 [n]
using Floats = py::array_t<float, py::array::c_style>;  // fp32, row-major, no conversion

PYBIND11_MODULE(_engine, m) {
  m.doc() = "C++ paged KV block manager and continuous-batching scheduler (twins: fastrft.engine.block_manager, "
            "fastrft.engine.scheduler)";

  // Checks a 1-D id/token array; returns its length.
  static auto len1d = [](const Ids& a, const char* name) -> int64_t {
    if (a.ndim() != 1) throw std::invalid_argument(std::string(name) + " must be a 1-D integer sequence");
    return static_cast<int64_t>(a.shape(0));
  };
  // A fresh numpy array holding a copy of v.
  static auto to_numpy = [](const auto& v) {
    using T = typename std::decay_t<decltype(v)>::value_type;
    py::array_t<T> a(static_cast<py::ssize_t>(v.size()));
    std::copy(v.begin(), v.end(), a.mutable_data());
    return a;
  };
  // A numpy view of a ScheduleOutput field that keeps the owning Python object alive.
  static auto view = [](py::handle owner, const auto& v, py::ssize_t cols) {
    using T = typename std::decay_t<decltype(v)>::value_type;
    const py::ssize_t rows = static_cast<py::ssize_t>(v.size()) / cols;
    const py::ssize_t item = static_cast<py::ssize_t>(sizeof(T));
    if (cols == 1) return py::array_t<T>({rows}, {item}, v.data(), owner);
    return py::array_t<T>({rows, cols}, {item * cols, item}, v.data(), owner);
  };
  // Property getter for a ScheduleOutput vector field, as a [n] or [n / cols, cols] view.
  static auto field = [](auto member, py::ssize_t cols) {
    return [member, cols](py::handle self) { return view(self, self.cast<const ScheduleOutput&>().*member, cols); };
  };

  m.def("chain_hash", [](py::int_ prev, const Ids& tokens) {
          // prev is taken modulo 2**64, as the Python twin does.
          const uint64_t p = PyLong_AsUnsignedLongLongMask(prev.ptr());
          if (PyErr_Occurred()) throw py::error_already_set();
          return fastrft::chain_hash(p, tokens.data(), len1d(tokens, "tokens"));
        },
        py::arg("prev"), py::arg("tokens"), "uint64 splitmix64 chain hash of tokens (low 32 bits each) onto prev");

  m.def("race_search", [](const Floats& z, int64_t vocab, const Floats& block_max, const Ids& seeds,
                          const Ids& positions, int threads) {
          if (z.ndim() != 2 || block_max.ndim() != 2) throw std::invalid_argument("z and block_max must be 2-D");
          const int64_t B = z.shape(0), nb = (vocab + 63) / 64;
          if (vocab < 1 || vocab > z.shape(1)) throw std::invalid_argument("vocab must lie in [1, z.shape[1]]");
          if (block_max.shape(0) != B || block_max.shape(1) != nb)
            throw std::invalid_argument("block_max must be [B, ceil(vocab / 64)]");
          if (len1d(seeds, "seeds") != B || len1d(positions, "positions") != B)
            throw std::invalid_argument("seeds and positions must hold one entry per row of z");
          py::array_t<int64_t> out(static_cast<py::ssize_t>(B));
          const float* zp = z.data();
          const float* bp = block_max.data();
          const int64_t *sp = seeds.data(), *pp = positions.data();
          int64_t* op = out.mutable_data();
          const int64_t stride = z.shape(1);
          {
            py::gil_scoped_release release;
            fastrft::race_search(zp, B, vocab, stride, bp, sp, pp, op, std::max(1, threads));
          }
          return out;
        },
        py::arg("z"), py::arg("vocab"), py::arg("block_max"), py::arg("seeds"), py::arg("positions"),
        py::arg("threads") = 1, "per row, the id of the largest z + Gumbel noise (fastrft.kernels.sampling.sample_torch's block search)");
  m.def("fixed_ln", [](const Floats& x) {
          py::array_t<float> out(x.size());
          for (py::ssize_t i = 0; i < x.size(); ++i) out.mutable_data()[i] = fastrft::fixed_ln(x.data()[i]);
          return out;
        },
        py::arg("x"), "fastrft.kernels.noise.ln over a flat fp32 array (for tests)");

  py::class_<BlockManager>(m, "BlockManager")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def_property_readonly("num_free_blocks", &BlockManager::num_free_blocks)
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"))
      .def("allocate", [](BlockManager& bm, int64_t seq_id, const Ids& tokens) {
            return bm.allocate(seq_id, tokens.data(), len1d(tokens, "token_ids"));
          }, py::arg("seq_id"), py::arg("token_ids"))
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"))
      .def("append", [](BlockManager& bm, int64_t seq_id, int64_t token_id) {
            const auto r = bm.append(seq_id, token_id);
            py::object copy = py::none();
            if (r.copy_src >= 0) copy = py::make_tuple(r.copy_src, r.copy_dst);
            return py::make_tuple(r.slot, copy);
          }, py::arg("seq_id"), py::arg("token_id"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("reset_prefix_cache", &BlockManager::reset_prefix_cache)
      .def("block_table", [](const BlockManager& bm, const Ids& ids) {
            const int64_t B = len1d(ids, "seq_ids"), width = bm.max_blocks(ids.data(), B);
            py::array_t<int32_t> out({static_cast<py::ssize_t>(B), static_cast<py::ssize_t>(width)});
            bm.block_table(ids.data(), B, width, out.mutable_data());
            return out;
          }, py::arg("seq_ids"))
      .def("slot_mapping", [](const BlockManager& bm, const Ids& ids, const Ids& starts) {
            const int64_t B = len1d(ids, "seq_ids"), S = len1d(starts, "starts");
            if (B != S)
              throw std::invalid_argument("seq_ids and starts differ in length: " + std::to_string(B) + " vs " +
                                          std::to_string(S));
            return to_numpy(bm.slot_mapping(ids.data(), starts.data(), B));
          }, py::arg("seq_ids"), py::arg("starts"))
      .def("context_lens", [](const BlockManager& bm, const Ids& ids) {
            const int64_t B = len1d(ids, "seq_ids");
            py::array_t<int32_t> out(static_cast<py::ssize_t>(B));
            bm.context_lens(ids.data(), B, out.mutable_data());
            return out;
          }, py::arg("seq_ids"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("blocks_of", &BlockManager::blocks_of, py::arg("seq_id"))
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("has", &BlockManager::has, py::arg("seq_id"));

  py::class_<ScheduleOutput>(m, "ScheduleOutput")
      .def_readonly("kind", &ScheduleOutput::kind)
      .def_property_readonly("seq_ids", field(&ScheduleOutput::seq_ids, 1))
      .def_property_readonly("starts", field(&ScheduleOutput::starts, 1))
      .def_property_readonly("lens", field(&ScheduleOutput::lens, 1))
      .def_property_readonly("slot_mapping", field(&ScheduleOutput::slot_mapping, 1))
      .def_property_readonly("slots", field(&ScheduleOutput::slots, 1))
      .def_property_readonly("copies", field(&ScheduleOutput::copies, 2))
      .def_property_readonly("preempted", field(&ScheduleOutput::preempted, 1))
      .def("__repr__", [](const ScheduleOutput& o) {
            return "ScheduleOutput(kind='" + o.kind + "', " + std::to_string(o.seq_ids.size()) + " seqs, " +
                   std::to_string(o.preempted.size()) + " preempted)";
          });

  py::class_<Scheduler>(m, "Scheduler")
      .def(py::init<BlockManager&, int64_t, int64_t>(), py::arg("block_manager"), py::arg("max_num_seqs"),
           py::arg("max_num_batched_tokens"), py::keep_alive<1, 2>())
      .def_property_readonly("block_manager", &Scheduler::block_manager, py::return_value_policy::reference_internal)
      .def_property_readonly("num_waiting", &Scheduler::num_waiting)
      .def_property_readonly("num_running", &Scheduler::num_running)
      .def("add", [](Scheduler& s, int64_t seq_id, const Ids& tokens, int64_t group_size) {
            s.add(seq_id, tokens.data(), len1d(tokens, "token_ids"), group_size);
          }, py::arg("seq_id"), py::arg("token_ids"), py::arg("group_size") = 1)
      .def("schedule", &Scheduler::schedule)
      .def("fork", &Scheduler::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("append_token", &Scheduler::append_token, py::arg("seq_id"), py::arg("token"))
      .def("append_tokens", [](Scheduler& s, const Ids& ids, const Ids& tokens) {
            if (ids.ndim() != 1 || tokens.ndim() != 1)
              throw std::invalid_argument("seq_ids and token_ids must be 1-D integer sequences");
            if (ids.shape(0) != tokens.shape(0))
              throw std::invalid_argument("seq_ids and token_ids differ in length: " + std::to_string(ids.shape(0)) +
                                          " vs " + std::to_string(tokens.shape(0)));
            s.append_tokens(ids.data(), tokens.data(), static_cast<int64_t>(ids.shape(0)));
          }, py::arg("seq_ids"), py::arg("token_ids"))
      .def("finish", &Scheduler::finish, py::arg("seq_id"))
      .def("tokens", &Scheduler::tokens, py::arg("seq_id"))
      .def("status", &Scheduler::status, py::arg("seq_id"))
      .def("running_ids", [](const Scheduler& s) { return to_numpy(s.running_ids()); })
      .def("waiting_ids", [](const Scheduler& s) { return to_numpy(s.waiting_ids()); });
}
