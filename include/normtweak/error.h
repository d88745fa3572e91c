// One exception type for every error normtweak reports, and the macro that
// throws it. Messages name the values involved and, where there is one, the
// setting to change.
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace normtweak {

// What went wrong decides the Python exception the bindings translate to:
// invalid_argument -> ValueError, everything else -> RuntimeError.
enum class errc { invalid_argument, numerical, runtime };

class error : public std::runtime_error {
 public:
  error(errc code, const std::string& what) : std::runtime_error(what), code_(code) {}
  errc code() const noexcept { return code_; }

 private:
  errc code_;
};

}  // namespace normtweak

// NT_CHECK(cond, "format {}", args...): throws normtweak::error(invalid_argument)
// with the formatted message when cond is false.
#define NT_CHECK(cond, ...)                                                             \
  do {                                                                                  \
    if (!(cond))                                                                        \
      throw ::normtweak::error(::normtweak::errc::invalid_argument, fmt::format(__VA_ARGS__)); \
  } while (0)

#define NT_THROW(code, ...) throw ::normtweak::error((code), fmt::format(__VA_ARGS__))
