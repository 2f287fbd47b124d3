#pragma once
// CSV as RFC 4180 has it: comma-separated fields, fields in double quotes may hold commas,
// quotes (doubled) and line breaks; CRLF or LF line ends; a UTF-8 byte-order mark is skipped.
#include <string>
#include <string_view>
#include <vector>

namespace twins::data {

struct CsvRow {
  std::vector<std::string> fields;
  int64_t line = 0;  ///< 1-based line where the row starts, for messages
};

/// The rows of `text` (empty lines skipped). Throws std::runtime_error naming `name` and the
/// line for an unterminated quote, text after a closing quote, or a field longer than
/// `max_field_bytes`.
std::vector<CsvRow> parse_csv(std::string_view text, const std::string& name, size_t max_field_bytes = 1u << 16);

}  // namespace twins::data
