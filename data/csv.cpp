#include "twins/data/csv.h"

#include <stdexcept>

namespace twins::data {

std::vector<CsvRow> parse_csv(std::string_view text, const std::string& name, size_t max_field_bytes) {
  if (text.substr(0, 3) == "\xEF\xBB\xBF") text.remove_prefix(3);  // UTF-8 BOM
  std::vector<CsvRow> rows;
  CsvRow row;
  std::string field;
  int64_t line = 1;
  row.line = 1;
  bool row_has_content = false;
  auto fail = [&](const std::string& what) {
    return std::runtime_error(name + ":" + std::to_string(line) + ": " + what);
  };
  auto end_field = [&] {
    row.fields.push_back(std::move(field));
    field.clear();
  };
  auto end_row = [&] {
    end_field();
    if (row_has_content) rows.push_back(std::move(row));
    row = CsvRow();
    row_has_content = false;
  };
  size_t i = 0;
  while (i < text.size()) {
    const char c = text[i];
    if (c == '"' && field.empty()) {  // a quoted field
      const int64_t start = line;
      row_has_content = true;
      for (++i;; ++i) {
        if (i >= text.size()) {
          line = start;
          throw fail("a quoted field is not closed");
        }
        if (text[i] == '"') {
          if (i + 1 < text.size() && text[i + 1] == '"') {
            field += '"', ++i;
            continue;
          }
          ++i;
          break;
        }
        if (text[i] == '\n') ++line;
        field += text[i];
        if (field.size() > max_field_bytes)
          throw fail("a field longer than " + std::to_string(max_field_bytes) + " bytes");
      }
      if (i < text.size() && text[i] != ',' && text[i] != '\n' && text[i] != '\r')
        throw fail("text after the closing quote of a field");
      continue;
    }
    if (c == ',') {
      end_field();
      row_has_content = true;
    } else if (c == '\n' || c == '\r') {
      end_row();
      if (c == '\r' && i + 1 < text.size() && text[i + 1] == '\n') ++i;
      ++line;
      row.line = line;
    } else {
      if (c == '"') throw fail("a quote inside an unquoted field (quote the whole field and double the quote)");
      field += c;
      row_has_content = true;
      if (field.size() > max_field_bytes)
        throw fail("a field longer than " + std::to_string(max_field_bytes) + " bytes");
    }
    ++i;
  }
  end_row();
  return rows;
}

}  // namespace twins::data
