// Argument checks of steplaw's ops: raise c10::Error (RuntimeError in Python) with one
// sentence that names the bad value and what was expected.
#pragma once

#include <c10/util/Exception.h>

#define STEPLAW_CHECK(cond, ...) TORCH_CHECK(cond, "steplaw: ", __VA_ARGS__)
