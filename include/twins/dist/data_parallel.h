#pragma once
// Moved to <twins/distributed/data_parallel.h>; this path keeps compiling code written for twins 0.1.
#include "twins/distributed/data_parallel.h"
