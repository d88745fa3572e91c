// Logging: warnings about numerical trouble (damping retries, RTN fallbacks)
// go through one replaceable handler so that the Python bindings can route
// them to Python's `logging`/`warnings` instead of stderr.
#pragma once

#include <fmt/format.h>

#include <cstdio>
#include <functional>
#include <mutex>
#include <string>
#include <utility>

namespace normtweak {

enum class log_level { debug = 10, info = 20, warning = 30 };

using log_handler = std::function<void(log_level, const std::string&)>;

namespace detail {
struct log_state {
  std::mutex mu;
  log_handler handler;
  log_level threshold = log_level::info;
};
inline log_state& log_state_instance() {
  static log_state s;
  return s;
}
}  // namespace detail

// Replace the handler; an empty handler restores the default (stderr).
inline void set_log_handler(log_handler h) {
  auto& s = detail::log_state_instance();
  std::lock_guard<std::mutex> lock(s.mu);
  s.handler = std::move(h);
}

inline void set_log_level(log_level level) {
  auto& s = detail::log_state_instance();
  std::lock_guard<std::mutex> lock(s.mu);
  s.threshold = level;
}

inline void log(log_level level, const std::string& msg) {
  auto& s = detail::log_state_instance();
  log_handler h;
  {
    std::lock_guard<std::mutex> lock(s.mu);
    if (static_cast<int>(level) < static_cast<int>(s.threshold)) return;
    h = s.handler;
  }
  if (h) {
    h(level, msg);
  } else {
    const char* tag = level == log_level::warning ? "warning" : level == log_level::info ? "info" : "debug";
    std::fprintf(stderr, "normtweak %s: %s\n", tag, msg.c_str());
  }
}

template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  log(log_level::warning, fmt::format(f, std::forward<Args>(args)...));
}

template <typename... Args>
void info(fmt::format_string<Args...> f, Args&&... args) {
  log(log_level::info, fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace normtweak
