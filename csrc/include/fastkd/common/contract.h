// A named integer of the Python ↔ C++ contract (a dtype code, a divergence code, a statistics
// column). Each family header lists its names once in a NamedCode table; fastkd._C.contract()
// exports the tables and fastkd/backends/native.py check_contract compares them with Python's.
#pragma once

namespace fastkd {

struct NamedCode {
  const char* name;
  int code;
};

// Whether a table of `n` columns names each of 0 .. n−1 exactly once (a usable column list).
template <int N>
constexpr bool is_column_table(const NamedCode (&table)[N]) {
  for (int column = 0; column < N; ++column) {
    int hits = 0;
    for (int i = 0; i < N; ++i) hits += table[i].code == column ? 1 : 0;
    if (hits != 1) return false;
  }
  return true;
}

}  // namespace fastkd
