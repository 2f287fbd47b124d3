#include "twins/config.h"

#include "tests/test_util.h"

using namespace twins::config;
using twins::test::check_throws_with;

TEST_CASE("config: strict reader") {
  const nlohmann::json j = {{"lr", 0.1}, {"epochs", 10}, {"name", "x"}};
  double lr = 0;
  int epochs = 0;
  std::string name;
  ConfigReader r(j, "train");
  r.get("lr", lr);
  r.get("epochs", epochs);
  SUBCASE("all keys read") {
    r.get("name", name);
    r.finish();
    CHECK(lr == 0.1);
    CHECK(epochs == 10);
    CHECK(name == "x");
  }
  SUBCASE("a key left over is an error naming its path") {
    check_throws_with<std::invalid_argument>([&] { r.finish(); }, "train.name: unknown key");
  }
  check_throws_with<std::invalid_argument>(
      [&] {
        const nlohmann::json wrong = {{"epochs", "ten"}};
        ConfigReader bad(wrong, "train");
        bad.get("epochs", epochs);
      },
      "train.epochs: expected an integer, got \"ten\"");
  const nlohmann::json list = {1, 2};
  check_throws_with<std::invalid_argument>([&] { ConfigReader(list, "data"); }, "data: expected a JSON object");
}

TEST_CASE("config: an integer or auto") {
  const nlohmann::json j = {{"a", "auto"}, {"b", 3}, {"c", 4.0}, {"d", "many"}, {"e", 300}, {"f", true}, {"g", 4.5}};
  ConfigReader r(j, "train");
  int a = 0, b = 0, c = 0, absent = 7;
  r.get_or_auto("a", a, -1, 0, 256);
  r.get_or_auto("b", b, -1, 0, 256);
  r.get_or_auto("c", c, -1, 0, 256);
  r.get_or_auto("absent", absent, -1, 0, 256);
  CHECK(a == -1);
  CHECK(b == 3);
  CHECK(c == 4);
  CHECK(absent == 7);
  int x = 0;
  check_throws_with<std::invalid_argument>([&] { r.get_or_auto("d", x, -1, 0, 256); },
                                           "train.d: expected an integer or \"auto\", got \"many\"");
  check_throws_with<std::invalid_argument>([&] { r.get_or_auto("e", x, -1, 0, 256); },
                                           "train.e: 300 is out of range [0, 256]");
  check_throws_with<std::invalid_argument>([&] { r.get_or_auto("f", x, -1, 0, 256); },
                                           "train.f: expected an integer or \"auto\", got true");
  check_throws_with<std::invalid_argument>([&] { r.get_or_auto("g", x, -1, 0, 256); },
                                           "train.g: expected an integer or \"auto\", got 4.5");
  CHECK(x == 0);
}

TEST_CASE("config: --set overrides") {
  nlohmann::json j = {{"train", {{"epochs", 10}}}};
  apply_override(j, "train.epochs=3");
  apply_override(j, "data.root=/tmp/some dir");
  apply_override(j, "loss.coeffs=[1,2]");
  apply_override(j, "train.flag=true");
  CHECK(j["train"]["epochs"] == 3);
  CHECK(j["data"]["root"] == "/tmp/some dir");
  CHECK(j["loss"]["coeffs"] == nlohmann::json({1, 2}));
  CHECK(j["train"]["flag"] == true);
  check_throws_with<std::invalid_argument>([&] { apply_override(j, "novalue"); }, "expected key.path=value");
  check_throws_with<std::invalid_argument>([&] { apply_override(j, "train.epochs.x=1"); },
                                           "train.epochs is not an object");
  check_throws_with<std::invalid_argument>([&] { apply_override(j, "a..b=1"); }, "empty key");
  nlohmann::json v = {{"views", {{{{"type", "flip"}, {"p", 0.5}}}}}};
  apply_override(v, "views.0.0.p=0.25");
  CHECK(v["views"][0][0]["p"] == 0.25);
  check_throws_with<std::invalid_argument>([&] { apply_override(v, "views.3.0.p=1"); },
                                           "views is a list of 1; \"3\" is not an index in it");
}

TEST_CASE("config: nearest name") {
  CHECK(nearest("sim_coef", {"sim_coeff", "std_coeff", "cov_coeff"}) == "sim_coeff");
  CHECK(nearest("zzzzzz", {"sim_coeff"}).empty());
}

TEST_CASE("config: a whole text as an integer") {
  CHECK(parse_integer("42") == 42);
  CHECK(parse_integer("-3") == -3);
  CHECK(parse_integer("+7") == 7);    // std::stoll's form, which labels and sizes always accepted
  CHECK(parse_integer("  8") == 8);
  CHECK(parse_integer("9223372036854775807") == std::numeric_limits<long long>::max());
  CHECK_FALSE(parse_integer("").has_value());
  CHECK_FALSE(parse_integer("5x").has_value());
  CHECK_FALSE(parse_integer("5 ").has_value());
  CHECK_FALSE(parse_integer("1.5").has_value());
  CHECK_FALSE(parse_integer("x5").has_value());
  CHECK_FALSE(parse_integer("9223372036854775808").has_value());  // overflow, not a wrapped value
}
