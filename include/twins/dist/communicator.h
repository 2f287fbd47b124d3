#pragma once
// Moved to <twins/distributed/communicator.h>; this path keeps compiling code written for twins 0.1.
#include "twins/distributed/communicator.h"
