{{ recsys.validate_vars() }}
{%- set split = var('split') -%}
{%- set valid_frac = var('valid_frac') | float -%}
{%- set test_frac = var('test_frac') | float -%}

{#
  Every mode computes, per event: `position` (1-based order inside its ordering group),
  `n_events` (size of the group), `n_test` and `n_valid`. The last n_test positions are
  test, the n_valid before them valid, the rest train. Exact rules: int_split.yml.
#}

with

events as (

    select event_id, user_id, item_id, rating, ts
    from {{ ref('stg_interactions') }}

),

{% if split == 'temporal' %}
-- one global group ordered by time
ranked as (

    select
        *,
        row_number() over (order by ts, event_id) as position,
        count(*) over () as n_events
    from events

),

sized as (

    select
        *,
        ceil({{ test_frac }} * n_events) as n_test,
        ceil({{ valid_frac }} * n_events) as n_valid
    from ranked

),

{% elif split == 'leave_last_out' %}
-- one group per user ordered by time; only users with >= 3 events give up events
ranked as (

    select
        *,
        row_number() over (partition by user_id order by ts, event_id) as position,
        count(*) over (partition by user_id) as n_events
    from events

),

sized as (

    select
        *,
        case when n_events >= 3 then 1 else 0 end as n_test,
        case when n_events >= 3 then 1 else 0 end as n_valid
    from ranked

),

{% elif split == 'stratified' %}
-- one group per user in a seeded pseudo-random order; only users with >= 3 events give up
-- events, and at least one event of every user stays train
ranked as (

    select
        *,
        row_number() over (
            partition by user_id
            order by
                {{ dbt.hash(dbt.concat([dbt.cast('event_id', dbt.type_string()), "'-'", "'" ~ var('split_seed') ~ "'"])) }},
                event_id
        ) as position,
        count(*) over (partition by user_id) as n_events
    from events

),

sized_raw as (

    select
        *,
        case when n_events >= 3 then least(ceil({{ test_frac }} * n_events), n_events - 1) else 0 end as n_test
    from ranked

),

sized as (

    select
        *,
        case
            when n_events >= 3 then least(ceil({{ valid_frac }} * n_events), n_events - 1 - n_test)
            else 0
        end as n_valid
    from sized_raw

),

{% endif %}
assigned as (

    select
        event_id,
        user_id,
        item_id,
        rating,
        ts,
        case
            when position > n_events - n_test then 'test'
            when position > n_events - n_test - n_valid then 'valid'
            else 'train'
        end as split
    from sized

)

select * from assigned
